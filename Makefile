# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check bach tests bench examples
	$(BIN)/ruff format --check bach tests bench examples
	$(BIN)/mypy bach

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .bach

# `make test` runs the property-based API tests briefly; this runs them long (examples per
# operation and per store), e.g. `make fuzz FUZZ_EXAMPLES=5000`.
FUZZ_EXAMPLES ?= 1000
.PHONY: fuzz
fuzz: $(STAMP)
	BACH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest --timeout 3600 \
		tests/api/test_schemathesis.py tests/api/test_roundtrip.py

"""Arbitrary JSON through a real `bach serve`, on SQLite and on Redis (issue 12, item 9):
what is accepted comes back equal, as the request's input and result, and as the input
and result of the job that echoed it, both in the answer to the submission and when
read again.

Equal means equal as JSON, types included: ``1``, ``1.0`` and ``true`` differ, and so do
``0.0`` and ``-0.0``. ``BACH_FUZZ_EXAMPLES`` sets the examples per store (``make fuzz``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import drop_prefix, redis_store, require_redis
from tests.helpers import FIXTURES, System, running_system

pytestmark = pytest.mark.slow

SCORES = [FIXTURES / "edge.yaml"]
EXAMPLES_PER_STORE = int(os.environ.get("BACH_FUZZ_EXAMPLES", "40"))
#: Levels of nesting the body may hold (bach.core.limits.Limits.depth) ...
DEPTH = 64
#: ... of which the body object ``{"todo": [...], "input": ...}`` takes one.
DEEPEST_INPUT = DEPTH - 1
MiB = 1024 * 1024

EDGE_INTS = [
    2**53 + 1,  # the first integer a double cannot hold
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**300,
    -(10**300),
]
EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,  # the smallest subnormal
    -5e-324,
    2.2250738585072014e-308,  # the smallest normal
    1.7976931348623157e308,  # the largest double
    -1.7976931348623157e308,
    0.1,
    1e16,
    123456789.12345679,
]
#: Around the surrogates, and characters that readers of JSON trip on.
EDGE_CHARS = [
    "\x00",
    "\x7f",
    "\x85",
    "\ud7ff",
    "\ue000",
    "\ufeff",
    "\ufffd",
    "\u2028",
    "\u2029",
    '"',
    "\\",
]


def plane_ends() -> list[str]:
    """The first and the last character of each of the 17 planes."""
    return [chr(plane << 16 | low) for plane in range(17) for low in (0, 0xFFFF)]


def is_surrogate(code: int) -> bool:
    return 0xD800 <= code <= 0xDFFF


#: Any character but a surrogate: Hypothesis's own (biased to the common ones), and code
#: points drawn evenly, so the astral planes come up as often as they exist.
chars = st.one_of(
    st.characters(exclude_categories=["Cs"]),
    st.integers(0, 0x10FFFF).filter(lambda c: not is_surrogate(c)).map(chr),
    st.sampled_from(EDGE_CHARS + plane_ends()),
)
texts = st.text(chars, max_size=24)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**300), 10**300),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EDGE_FLOATS),
    texts,
)


def depth(value: Any) -> int:
    """Levels of arrays and objects: 0 for a scalar, 1 for ``[]``."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def chain(inner: Any, wrappers: list[tuple[bool, str]]) -> Any:
    """``inner`` wrapped in one list (False) or one-key object (True) per wrapper."""
    value = inner
    for as_object, key in wrappers:
        value = {key: value} if as_object else [value]
    return value


trees = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(texts, children, max_size=6),
    max_leaves=40,
)
wide = st.dictionaries(texts, leaves, min_size=50, max_size=200) | st.lists(
    leaves, min_size=50, max_size=300
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A tree at the bottom of a chain of lists and objects, down to DEEPEST_INPUT."""
    inner = draw(trees)
    room = DEEPEST_INPUT - depth(inner)
    if room < 1:
        return inner
    levels = draw(st.integers(1, room))
    return chain(
        inner, draw(st.lists(st.tuples(st.booleans(), texts), min_size=levels, max_size=levels))
    )


json_values = st.one_of(trees, wide, deep()).filter(lambda v: depth(v) <= DEEPEST_INPUT)


def difference(got: Any, want: Any, path: str = "input") -> str | None:
    """Where ``got`` and ``want`` differ as JSON, types included; None when they do not."""
    if type(got) is not type(want):
        return f"{path}: {want!r:.80} came back as {got!r:.80}"
    if isinstance(want, dict):
        if set(got) != set(want):
            return f"{path}: keys {sorted(set(got) ^ set(want))[:5]!r:.200} differ"
        for key, item in want.items():
            found = difference(got[key], item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(want, list):
        if len(got) != len(want):
            return f"{path}: {len(want)} items came back as {len(got)}"
        for i, (mine, item) in enumerate(zip(got, want, strict=True)):
            found = difference(mine, item, f"{path}[{i}]")
            if found:
                return found
        return None
    # repr tells -0.0 from 0.0 and shows every digit of a float
    if repr(got) != repr(want):
        return f"{path}: {want!r:.80} came back as {got!r:.80}"
    return None


def assert_echoed(view: dict[str, Any], value: Any) -> None:
    assert view["status"] == "COMPLETE", json.dumps(view)[:2000]
    job = view["jobs"]["echo"]
    for where, got in [
        ("input", view["input"]),
        ("result", view["result"]),
        ("jobs.echo.input", job["input"]),
        ("jobs.echo.result", job["result"]),
    ]:
        found = difference(got, value, where)
        assert found is None, found


def round_trip(http: httpx.Client, value: Any, *, ascii_only: bool = False) -> None:
    """Submit ``value`` to the echo service, wait for it, read the request back."""
    body = json.dumps({"todo": ["echo"], "input": value}, ensure_ascii=ascii_only, allow_nan=False)
    sent = http.post(
        "/api/requests",
        params={"wait": 30},
        content=body.encode("utf-8"),
        headers={"content-type": "application/json"},
    )
    assert sent.status_code == 201, sent.text[:2000]
    view = sent.json()
    assert_echoed(view, value)
    read = http.get(f"/api/requests/{view['id']}")
    assert read.status_code == 200, read.text[:2000]
    assert_echoed(read.json(), value)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def system(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    home = tmp_path_factory.mktemp(f"roundtrip-{request.param}")
    if request.param == "sqlite":
        with running_system(SCORES, f"sqlite:///{home}/bach.db", home) as found:
            yield found
        return
    require_redis()
    prefix = f"bach-test-{uuid.uuid4().hex[:12]}"
    try:
        with running_system(SCORES, redis_store(prefix), home) as found:
            yield found
    finally:
        drop_prefix(prefix)


@pytest.fixture(scope="module")
def http(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url, timeout=60) as client:
        yield client


@settings(
    max_examples=EXAMPLES_PER_STORE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(value=json_values, ascii_only=st.booleans())
def test_any_json_value_comes_back_equal(http: httpx.Client, value: Any, ascii_only: bool) -> None:
    round_trip(http, value, ascii_only=ascii_only)


def test_the_deepest_input_comes_back_equal(http: httpx.Client) -> None:
    for levels in (60, DEEPEST_INPUT):
        wrappers = [(i % 2 == 0, f"k{i}") for i in range(levels)]
        value = chain("bottom", wrappers)
        assert depth(value) == levels
        round_trip(http, value)


def test_an_input_of_900_kb_comes_back_equal(http: httpx.Client) -> None:
    every_plane = "".join(plane_ends() + EDGE_CHARS)
    value = {"ascii": "x" * 600_000, "planes": [every_plane] * 2000, "ints": EDGE_INTS}
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    assert 850_000 < size < MiB, size
    round_trip(http, value)


def test_integers_of_4000_digits_come_back_equal(http: httpx.Client) -> None:
    big = int("9" * 4000)
    round_trip(http, [big, -big, big // 7, *EDGE_INTS])


def test_floats_at_the_edges_come_back_equal(http: httpx.Client) -> None:
    round_trip(http, EDGE_FLOATS)
    round_trip(http, {"zero": 0.0, "minus zero": -0.0, "int": 0, "one": 1, "1.0": 1.0, "t": True})


@pytest.mark.parametrize("ascii_only", [False, True])
def test_the_ends_of_every_plane_come_back_equal(http: httpx.Client, ascii_only: bool) -> None:
    chars = plane_ends() + EDGE_CHARS
    value = {"each": chars, "all": "".join(chars), "keys": {c: c for c in chars}}
    round_trip(http, value, ascii_only=ascii_only)
    for char in chars:  # alone, where a reader's fast path for short strings is taken
        round_trip(http, char, ascii_only=ascii_only)


def test_wide_values_come_back_equal(http: httpx.Client) -> None:
    round_trip(http, list(range(20_000)))
    round_trip(http, {f"k{i}": i for i in range(10_000)})

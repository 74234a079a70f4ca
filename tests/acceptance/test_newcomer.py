"""What a newcomer does first, with the `bach` command that `make` installs (the console
script, not `python -m bach`, which puts the working folder on sys.path by itself)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import stop

pytestmark = pytest.mark.slow

#: `.venv/bin/bach`: the console script beside the interpreter running the tests.
BACH = Path(sys.executable).with_name("bach")

PLUGIN = """
import bach.commands as bach


class Greet(bach.Command):
    def execute(self, context, request):
        return f"hello {request}"
"""


def environment() -> dict[str, str]:
    """This environment without PYTHONPATH, which could put the working folder on the path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_bach(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert os.access(BACH, os.X_OK), f"no bach command at {BACH}"
    return subprocess.run(
        [str(BACH), *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=environment()
    )


def test_plugin_named_on_the_command_line_is_found_in_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / "greeter.py").write_text(PLUGIN)
    listed = run_bach("plugins", "--plugin", "greeter", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "greeter  (module greeter)  commands: Greet" in listed.stdout
    missing = run_bach("plugins", "--plugin", "greeter", cwd=tmp_path.parent)
    assert missing.returncode == 2
    assert "greeter  BROKEN: cannot import 'greeter'" in missing.stderr


def test_serve_runs_a_command_of_a_plugin_in_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / "greeter.py").write_text(PLUGIN)
    # The score elsewhere, as `bach serve --score examples/arith.yaml` from the repo's root:
    # a plugin beside the score was always found.
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "score.yaml").write_text("services: {}\n")
    args = ["serve", "--score", "scores/score.yaml", "--port", "0", "--store", "memory://"]
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(
            [str(BACH), *args, "--plugin", "greeter"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=environment(),
        )
    try:
        assert serve.stdout is not None
        ready, _, _ = select.select([serve.stdout], [], [], 30)
        line = serve.stdout.readline() if ready else ""
        url = re.search(r"http://\S+", line)
        assert url is not None, (tmp_path / "serve.log").read_text()
        response = httpx.post(
            f"{url.group(0)}/api/commands",
            params={"wait": 10},
            json={"commands": [{"command": "Greet", "request": "newcomer"}]},
        )
    finally:
        stop(serve)
    assert response.status_code == 201, response.text
    assert response.json()["children"]["Greet"]["response"] == "hello newcomer"
    log = (tmp_path / "serve.log").read_text()
    assert "plugin greeter (module greeter): commands Greet" in log
    assert "broken" not in log


def test_validate_names_an_unclosed_expression_and_a_missing_client_param(
    tmp_path: Path,
) -> None:
    (tmp_path / "score.yaml").write_text(
        "services:\n"
        '  A: {handler: "m:f"}\n'
        "rubrics:\n"
        "  r:\n"
        "    tasks:\n"
        '      t: {service: A, input: "${input.x"}\n'
        '      u: {service: A, after: [t], input: "${params.watermark}"}\n'
        "clients:\n"
        "  X: r\n"
    )
    checked = run_bach("validate", "score.yaml", cwd=tmp_path)
    assert checked.returncode == 2
    assert checked.stdout == ""
    assert checked.stderr.splitlines() == [
        "bach: invalid score: score.yaml, rubric 'r', task 't', field 'input': the '${' of "
        "'${input.x' is not closed: end the expression with '}' (or write '$${' for a "
        "literal '${')",
        "bach: invalid score: score.yaml, field 'params': client 'X' does not define param "
        "'watermark', which rubric 'r' reads (${params.watermark} in task 'u'; defined: none)",
    ]

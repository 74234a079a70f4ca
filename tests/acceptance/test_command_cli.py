"""`bach command list`, `get` and `cancel` against real systems: a cancelled run starts no
child call after, whichever engine on the store it was cancelled through."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EXAMPLES, System, bach, running_system

pytestmark = pytest.mark.slow

PLUGIN = '''
"""Gate: child "one", then wait for a marker file, then child "two"."""
import os
import time
from pathlib import Path

import bach.commands as bach

HOME = Path(os.environ["PLUG_HOME"])


class Step(bach.Command):
    def execute(self, context, request):
        with open(HOME / f"calls-{request}", "a") as log:
            log.write("x")
        return request


class Gate(bach.Command):
    def execute(self, context, request):
        context.execute(Step, "one", alias="one")
        while not (HOME / "marker").exists():
            time.sleep(0.05)
        context.execute(Step, "two", alias="two")
        return "done"
'''


def setup(home: Path) -> tuple[list[Path], dict[str, str]]:
    """Seed 004's commands (arith.yaml's plugin) and Gate."""
    (home / "gateplug.py").write_text(PLUGIN)
    score = home / "score.yaml"
    score.write_text("services: {}\nplugins: [gateplug]\n")
    return [EXAMPLES / "arith.yaml", score], {"PLUG_HOME": str(home)}


def cli(system: System, *args: str) -> Any:
    return bach(*args, "--server", system.url)


def tree(system: System, ref: str) -> dict[str, Any]:
    done = cli(system, "command", "get", ref, "--json")
    found: dict[str, Any] = json.loads(done.stdout)
    ended_badly = found["status"] in ("FAILED", "CANCELLED")  # exit 1, as for requests
    assert done.returncode == (1 if ended_badly else 0), done.stderr
    return found


def start_gate(system: System, key: str) -> dict[str, Any]:
    """A Gate run, once its child "one" has completed and it waits for the marker."""
    started = cli(system, "command", "run", "Gate", "--key", key)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = tree(system, key)
        one = state["children"]["Gate"]["children"].get("one")
        if one and one["status"] == "COMPLETE":
            return state
        time.sleep(0.05)
    raise AssertionError(f"child one did not complete: {state}")


def calls(home: Path, name: str) -> int:
    path = home / f"calls-{name}"
    return len(path.read_text()) if path.exists() else 0


def test_list_get_and_cancel_a_run(tmp_path: Path) -> None:
    scores, env = setup(tmp_path)
    with running_system(scores, f"sqlite:///{tmp_path}/bach.db", tmp_path, env=env) as system:
        done = cli(
            system, "command", "run", "CommandOne", "--request", "1", "--key", "c1", "--wait"
        )
        assert done.returncode == 0 and "COMPLETE" in done.stdout, done.stderr
        request = cli(system, "submit", "--todo", "A", "--input", "1", "--wait", "--json")
        request_id = json.loads(request.stdout)["id"]
        gate = start_gate(system, "g1")

        listed = cli(system, "command", "list").stdout.splitlines()
        assert [line.split()[:2] for line in listed] == [  # newest first, runs only
            [gate["id"], "RUNNING"],
            [tree(system, "c1")["id"], "COMPLETE"],
        ]
        assert "Gate" in listed[0] and "key=g1" in listed[0] and "CommandOne" in listed[1]
        assert request_id not in "\n".join(listed)

        cancelled = cli(system, "command", "cancel", "g1")
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"command run {gate['id']} (key g1): CANCELLED" in cancelled.stdout
        assert "one (Step): COMPLETE" in cancelled.stdout
        assert "Gate: FAILED" in cancelled.stdout and "Cancelled" in cancelled.stdout

        (tmp_path / "marker").touch()  # Gate would now call child "two"
        time.sleep(1.5)
        state = tree(system, "g1")
        assert state["status"] == "CANCELLED"
        assert "two" not in state["children"]["Gate"]["children"]
        assert calls(tmp_path, "one") == 1 and calls(tmp_path, "two") == 0

        again = cli(system, "command", "cancel", "g1")
        assert again.returncode == 2 and "already ended (CANCELLED)" in again.stderr
        unknown = cli(system, "command", "cancel", "no-such-run")
        assert unknown.returncode == 2 and "no-such-run" in unknown.stderr

        by_status = {
            status: [
                line.split()[0]
                for line in cli(system, "command", "list", "--status", status).stdout.splitlines()
            ]
            for status in ("CANCELLED", "COMPLETE", "RUNNING")
        }
        assert by_status == {
            "CANCELLED": [gate["id"]],
            "COMPLETE": [tree(system, "c1")["id"]],
            "RUNNING": [],
        }
        as_json = json.loads(cli(system, "command", "list", "--json").stdout)
        assert (
            as_json[0]["commands"] == {"Gate": "Gate"}
            and as_json[0]["error"]["type"] == "Cancelled"
        )
        assert gate["id"] not in cli(system, "list").stdout  # `bach list` is for requests


def test_a_run_cancelled_through_another_engine_starts_no_child_after(tmp_path: Path) -> None:
    scores, env = setup(tmp_path)
    store = f"sqlite:///{tmp_path}/bach.db"
    with (
        running_system(scores, store, tmp_path, env=env) as owner,
        running_system(scores, store, tmp_path, "--no-workers", env=env) as other,
    ):
        gate = start_gate(owner, "g2")
        cancelled = cli(other, "command", "cancel", gate["id"])
        assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout, cancelled.stderr
        (tmp_path / "marker").touch()
        deadline = time.monotonic() + 10
        while "was cancelled; stopped executing it" not in owner.log.read_text():
            assert time.monotonic() < deadline, owner.log.read_text()
            time.sleep(0.1)
        state = tree(owner, "g2")
    assert state["status"] == "CANCELLED"
    assert "two" not in state["children"]["Gate"]["children"]
    assert calls(tmp_path, "one") == 1 and calls(tmp_path, "two") == 0

"""The system as a user drives it: `bach serve` as a process, `bach submit` from another."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import BACH, EXAMPLES, FIXTURES, bach, running_system, start_system, stop

pytestmark = pytest.mark.slow


def test_seed_002_examples_through_the_cli_and_http(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system([EXAMPLES / "arith.yaml"], store, tmp_path) as system:
        one = bach("submit", "--todo", "A,B", "--input", "5", "--wait", "--server", system.url)
        assert one.returncode == 0, one.stderr
        assert "COMPLETE" in one.stdout and "result: 14" in one.stdout
        two = bach(
            "submit",
            "--todo",
            "B,A",
            "--input",
            "5",
            "--wait",
            "--key",
            "ex2",
            "--server",
            system.url,
        )
        assert two.returncode == 0 and "result: 12" in two.stdout
        lines = [line.split() for line in two.stdout.splitlines() if line.startswith("  ")]
        assert lines[0][:4] == ["B", "COMPLETE", "input=5", "result=10"]
        assert lines[1][:4] == ["A", "COMPLETE", "input=10", "result=12"]
        trace = httpx.get(f"{system.url}/api/requests/ex2").json()["jobs"]
        assert (trace["B"]["input"], trace["B"]["result"]) == (5, 10)
        assert (trace["A"]["input"], trace["A"]["result"]) == (10, 12)
        got = bach("get", "ex2", "--server", system.url)
        assert got.returncode == 0 and "result: 12" in got.stdout
        listed = bach("list", "--status", "COMPLETE", "--server", system.url)
        assert listed.stdout.count("COMPLETE") == 2


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system([EXAMPLES / "arith.yaml"], store, tmp_path, "--no-workers") as system:
        unknown = bach("submit", "--rubric", "nope", "--input", "1", "--server", system.url)
        assert unknown.returncode == 2
        assert unknown.stderr.strip().splitlines() == [
            "bach: error: rubric: unknown rubric 'nope' (known: add_then_double)"
        ]
    gone = bach("submit", "--todo", "A", "--server", "http://127.0.0.1:9")
    assert gone.returncode == 3 and len(gone.stderr.strip().splitlines()) == 1
    assert "cannot reach the Bach server at http://127.0.0.1:9" in gone.stderr


def test_an_invalid_score_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "arith.yaml").read_text().replace("after: [add]", "after: [ad]"))
    result = bach("serve", "--score", str(bad), "--port", "0", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert (
        "bad.yaml, rubric 'add_then_double', task 'double', field 'after': unknown task 'ad'"
        in result.stderr
    )
    assert bach("validate", str(bad)).returncode == 2
    assert bach("validate", str(EXAMPLES / "arith.yaml")).returncode == 0


def test_a_handler_that_cannot_be_imported_is_refused_at_start(tmp_path: Path) -> None:
    score = tmp_path / "s.yaml"
    score.write_text('services:\n  X: {handler: "no_such_module:f"}\n')
    result = bach("serve", "--score", str(score), "--port", "0", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "s.yaml, service 'X', field 'handler': cannot import 'no_such_module'" in result.stderr


def test_diamond_runs_b_and_c_at_once_on_two_processes_and_d_once(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system(
        [FIXTURES / "svc.yaml"], store, tmp_path, env={"BACH_TEST_LOG": str(log)}
    ) as system:
        done = httpx.post(
            f"{system.url}/api/requests",
            params={"wait": 30},
            json={"rubric": "diamond", "input": 1},
            timeout=40,
        ).json()
    assert done["status"] == "COMPLETE"
    assert done["result"] == "d(['b(a(1))', 'c(a(1))'])"
    from tests.helpers import read_log

    calls = {c["task"]: c for c in read_log(log)}
    assert sorted(c["task"] for c in read_log(log)) == ["a", "b", "c", "d"]
    b, c = calls["b"], calls["c"]
    assert b["pid"] != c["pid"]
    assert b["start"] < c["end"] and c["start"] < b["end"], "b and c did not overlap"
    assert calls["d"]["start"] >= max(b["end"], c["end"])


def test_sigterm_stops_the_system_and_its_workers(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system([EXAMPLES / "arith.yaml"], store, tmp_path) as system:
        assert len(system.workers()) == 2  # one for each service
        started = system.children()  # the workers and the fork server
        system.process.send_signal(signal.SIGTERM)
        system.process.wait(30)
        assert system.process.returncode == 0
        assert system.process.stdout is not None
        assert "bach: stopped" in system.process.stdout.read()
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive


def test_retention_takes_durations_and_refuses_nonsense(tmp_path: Path) -> None:
    from bach.cli import Duration

    assert Duration().convert("7d", None, None) == 7 * 86400
    assert Duration().convert("15m", None, None) == 900
    refused = bach(
        "serve", "--score", str(EXAMPLES / "arith.yaml"), "--retain", "soon", cwd=tmp_path
    )
    assert refused.returncode == 2 and "'soon' is not a duration" in refused.stderr


ROW = re.compile(r"^(\S+)\s+\d+\s+\d+\s+.+?\s+\d+-\d+\s+[\d.]+\s+\S+\s+(\d+)\s+\d+", re.M)


def _done(frame: str) -> dict[str, int]:
    """Each service's completed count in one table of ``bach status``."""
    return {name: int(done) for name, done in ROW.findall(frame)}


def _wait_for(path: Path, pattern: str, after: int = 0, timeout: float = 30) -> int:
    """Where ``pattern`` first shows in the file past ``after``, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.compile(pattern, re.M).search(path.read_text(), after)
        if match:
            return match.start()
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never showed:\n{path.read_text()[-3000:]}")


def test_status_watch_refreshes_and_rides_out_a_server_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    system = start_system([EXAMPLES / "arith.yaml"], store, tmp_path)
    port = system.url.rsplit(":", 1)[1]
    out = tmp_path / "watch.out"
    with open(out, "w") as sink:  # a pipe: one stamped table per refresh
        watch = subprocess.Popen(
            [*BACH, "status", "--watch", "--interval", "0.2", "--server", system.url],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            # Ctrl-C as a terminal delivers it, whatever the runner did to SIGINT.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        _wait_for(out, r"^A\s")
        sent = bach("submit", "--todo", "A,B", "--input", "5", "--wait", "--server", system.url)
        assert sent.returncode == 0, sent.stderr
        frames = re.split(r"^\d\d:\d\d:\d\d$", out.read_text(), flags=re.M)
        assert _done(frames[1]) == {"A": 0, "B": 0}, frames[1]
        # Later tables show the request's two tasks done: the table refreshes.
        _wait_for(out, r"^B\s.*\s1\s+0\s+-", after=len(frames[0]) + len(frames[1]))
        stop(system.process)
        lost = _wait_for(out, r"cannot reach the Bach server .*; retrying$")
        system = start_system([EXAMPLES / "arith.yaml"], store, tmp_path, "--port", port)
        # A fresh table (no warning over it) once the server is back, with the counts the
        # store kept across the restart.
        back = _wait_for(out, r"^\d\d:\d\d:\d\d\nactive requests 0", after=lost)
        fresh = out.read_text()[back:].split("\n\n")[0]
        assert _done(fresh) == {"A": 1, "B": 1}, fresh
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0  # Ctrl-C ends the watch quietly
        assert "Traceback" not in out.read_text()
    finally:
        stop(watch)
        stop(system.process)

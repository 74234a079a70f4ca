"""Failures a user can debug, retry and stop (issue 13), through a real `bach serve` with
its workers as real processes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import FIXTURES, System, Workers, bach, read_log, running_system

SCORE = FIXTURES / "failures.yaml"


@dataclass
class Run:
    system: System
    http: httpx.Client
    log: Path
    flags: Path

    def submit(self, body: dict[str, Any], wait: float = 30) -> dict[str, Any]:
        answer = self.http.post("/api/requests", params={"wait": wait}, json=body)
        assert answer.status_code in (200, 201), answer.text
        found: dict[str, Any] = answer.json()
        return found

    def wait(self, rid: str, wait: float = 30) -> dict[str, Any]:
        found: dict[str, Any] = self.http.get(f"/api/requests/{rid}", params={"wait": wait}).json()
        return found

    def calls(self, task: str) -> list[dict[str, Any]]:
        return [c for c in read_log(self.log) if c["task"] == task]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    log, flags = tmp_path / "calls.log", tmp_path / "flag"
    env = {"BACH_TEST_LOG": str(log), "BACH_TEST_FLAGS": str(flags)}
    store = f"sqlite:///{tmp_path}/bach.db"
    with (
        running_system([SCORE], store, tmp_path, env=env) as system,
        httpx.Client(base_url=system.url, timeout=60) as http,
    ):
        yield Run(system, http, log, flags)


def test_every_attempt_is_on_record_with_its_type_and_traceback(run: Run) -> None:
    done = run.submit({"todo": ["twice"], "input": 7})
    assert done["status"] == "COMPLETE" and done["result"] == 7
    job = done["jobs"]["twice"]
    assert job["attempts"] == 3
    history = job["history"]
    assert [a["outcome"] for a in history] == ["failed", "failed", "ok"]
    for attempt in history[:2]:
        assert attempt["error"]["type"] == "ValueError"
        assert attempt["error"]["message"] == "ValueError: not yet: 7"
        assert "Traceback (most recent call last)" in attempt["error"]["traceback"]
        assert 'raise ValueError(f"not yet: {value!r}")' in attempt["error"]["traceback"]
    pids = {c["pid"] for c in run.calls("twice")}
    assert {a["pid"] for a in history} <= pids and all(a["host"] for a in history)
    assert all(a["started_at"] <= a["ended_at"] for a in history)
    # The serve log has one line per failed attempt with its id, task, attempt and type.
    text = run.system.log.read_text()
    lines = [line for line in text.splitlines() if done["id"] in line and "failed" in line]
    assert len(lines) == 2, text
    assert "task twice attempt 1 failed: ValueError" in lines[0]


def test_fatal_and_non_retryable_errors_fail_after_one_attempt(run: Run) -> None:
    fatal = run.submit({"todo": ["fatal"], "input": 1})
    assert fatal["status"] == "FAILED"
    job = fatal["jobs"]["fatal"]
    assert job["attempts"] == 1 and job["history"][0]["error"]["type"] == "Fatal"
    assert "order 1 does not exist" in fatal["error"]["message"]
    picky = run.submit({"todo": ["picky"], "input": "b"})
    assert picky["status"] == "FAILED" and picky["jobs"]["picky"]["attempts"] == 1
    assert picky["jobs"]["picky"]["history"][0]["error"]["type"] == "KeyError"
    exits = run.submit({"todo": ["exits3"], "input": 1})
    assert exits["status"] == "FAILED" and exits["jobs"]["exits3"]["attempts"] == 1
    error = exits["jobs"]["exits3"]["history"][0]["error"]
    assert error["exit_status"] == 3 and error["stderr"] == "the disk is on fire"
    assert len(run.calls("fatal")) == 1 and len(run.calls("picky")) == 1


def test_an_attempt_lost_with_its_worker_is_counted_and_the_job_completes(run: Run) -> None:
    rid = run.submit({"todo": ["slow"], "input": 30}, wait=0)["id"]
    deadline = time.monotonic() + 20
    while not run.calls("slow") and time.monotonic() < deadline:
        time.sleep(0.05)
    [call] = run.calls("slow")
    os.kill(call["pid"], signal.SIGKILL)
    done = run.wait(rid)
    assert done["status"] == "COMPLETE" and done["result"] == 30
    job = done["jobs"]["slow"]
    assert job["attempts"] == 2
    lost, ok = job["history"]
    assert lost["outcome"] == "lost" and lost["reason"] == "worker died"
    assert f":{call['pid']}:" in lost["worker"] and ok["outcome"] == "ok"


def test_retry_runs_only_the_failed_task_and_those_after_it(run: Run) -> None:
    failed = run.submit({"rubric": "three_steps", "input": 1})
    assert failed["status"] == "FAILED" and failed["error"]["task"] == "b"
    assert failed["jobs"]["a"]["result"] == 2
    run.flags.write_text("up")  # the second service is back
    answer = run.http.post(f"/api/requests/{failed['id']}/retry")
    assert answer.status_code == 200, answer.text
    done = run.wait(failed["id"])
    assert done["status"] == "COMPLETE" and done["result"] == 23
    assert len(run.calls("first")) == 1  # its result was kept
    assert len(run.calls("second")) == 2 and len(run.calls("third")) == 1
    assert [t["event"] for t in done["trace"]] == ["retried"]
    assert done["trace"][0]["from"] == "FAILED" and done["trace"][0]["tasks"] == ["b"]
    again = run.http.post(f"/api/requests/{failed['id']}/retry")
    assert again.status_code == 409 and "COMPLETE" in again.json()["error"]["reason"]


def test_cancel_stops_the_running_program(run: Run) -> None:
    rid = run.submit({"todo": ["sleeper"], "input": 1}, wait=0)["id"]
    deadline = time.monotonic() + 20
    while not (run.flags.exists() and run.flags.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(run.flags.read_text())
    assert psutil.pid_exists(pid)
    cancelled = run.http.post(f"/api/requests/{rid}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    started = time.monotonic()
    # one heartbeat (1 s) to learn of it, then SIGTERM, which ends it at once
    while time.monotonic() - started < 2 + 1 + 2:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"program {pid} still runs {time.monotonic() - started:.1f}s on")
    after = run.wait(rid, wait=0)
    assert after["status"] == "CANCELLED" and after["jobs"]["sleeper"]["status"] == "CANCELLED"


def test_the_cli_shows_the_traceback_and_retries(run: Run) -> None:
    env = {"BACH_TEST_LOG": str(run.log), "BACH_TEST_FLAGS": str(run.flags)}
    failed = run.submit({"rubric": "three_steps", "input": 4})
    shown = bach("get", failed["id"], "--server", run.system.url, env=env)
    assert shown.returncode == 1, shown.stderr  # a request that failed
    assert "last attempt of second (RuntimeError):" in shown.stdout
    assert 'raise RuntimeError("the second service is down")' in shown.stdout
    run.flags.write_text("up")
    again = bach("retry", failed["id"], "--server", run.system.url, env=env)
    assert again.returncode == 0, again.stderr
    assert run.wait(failed["id"])["result"] == 53
    refused = bach("retry", failed["id"], "--server", run.system.url, env=env)
    assert refused.returncode != 0 and "only a FAILED or CANCELLED" in refused.stderr


def test_workers_started_by_hand_are_listed_while_they_run(tmp_path: Path) -> None:
    log, flags = tmp_path / "calls.log", tmp_path / "flag"
    env = {"BACH_TEST_LOG": str(log), "BACH_TEST_FLAGS": str(flags)}
    store = f"sqlite:///{tmp_path}/bach.db"
    workers = Workers(store, tmp_path, env, [SCORE])
    with (
        running_system([SCORE], store, tmp_path, "--no-workers", env=env) as system,
        httpx.Client(base_url=system.url, timeout=60) as http,
    ):
        try:
            one, two = workers.start("twice"), workers.start("first")

            def listed() -> dict[int, dict[str, Any]]:
                found = http.get("/api/stats").json()["workers"]
                return {w["pid"]: w for w in found}

            deadline = time.monotonic() + 20
            while set(listed()) != {one.pid, two.pid} and time.monotonic() < deadline:
                time.sleep(0.1)
            done = http.post("/api/requests", params={"wait": 30}, json={"todo": ["twice"]})
            assert done.json()["status"] == "COMPLETE"
            time.sleep(1.5)  # a heartbeat
            shown = listed()
            assert shown[one.pid]["services"] == ["twice"] and not shown[one.pid]["supervised"]
            assert shown[one.pid]["jobs_done"] == 3 and shown[two.pid]["jobs_done"] == 0
            assert shown[one.pid]["since"] <= time.time()
            status = bach("status", "--server", system.url, env=env)
            assert f"pid {one.pid} twice" in status.stdout and "started by hand" in status.stdout
            one.send_signal(signal.SIGTERM)  # stops: gone at once
            one.wait(20)
            two.send_signal(signal.SIGKILL)  # dies: gone at the engine's next sweep
            two.wait(20)
            deadline = time.monotonic() + 10
            while listed() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert listed() == {}
        finally:
            workers.stop_all()

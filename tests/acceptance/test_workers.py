"""Workers as a user runs them: by hand on a shared store, and stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    BACH,
    EXAMPLES,
    FIXTURES,
    System,
    read_log,
    running_system,
    start_system,
    stop,
)

pytestmark = pytest.mark.slow


def wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_running(system: System, job: dict[str, Any]) -> str:
    """Submit one job to service P and wait until a worker has it in hand."""
    url = f"{system.url}/api/requests"
    rid: str = httpx.post(url, json={"input": job, "todo": ["P"]}).json()["id"]
    wait_for(lambda: httpx.get(f"{url}/{rid}").json()["jobs"]["P"]["status"] == "RUNNING")
    return rid


def test_workers_started_by_hand_serve_a_system_without_its_own(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system([EXAMPLES / "arith.yaml"], store, tmp_path, "--no-workers") as system:
        rid = httpx.post(
            f"{system.url}/api/requests", json={"input": 5, "todo": ["A", "B"]}
        ).json()["id"]
        time.sleep(0.5)
        assert httpx.get(f"{system.url}/api/requests/{rid}").json()["status"] == "PENDING"
        workers = [
            subprocess.Popen(
                [
                    *BACH,
                    "worker",
                    "--score",
                    str(EXAMPLES / "arith.yaml"),
                    "--service",
                    name,
                    "--store",
                    store,
                ],
                cwd=tmp_path,
            )
            for name in ("A", "B")
        ]
        try:
            done = httpx.get(
                f"{system.url}/api/requests/{rid}", params={"wait": 30}, timeout=40
            ).json()
            assert done["status"] == "COMPLETE" and done["result"] == 14
            assert all(j["worker"] is None for j in done["jobs"].values())
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            codes = [worker.wait(20) for worker in workers]
        assert codes == [0, 0]


def test_sigterm_lets_a_running_job_finish(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    store = f"sqlite:///{tmp_path}/bach.db"
    job = {"task": "t", "value": 1, "sleep": 1.5}
    system = start_system([FIXTURES / "svc.yaml"], store, tmp_path, env=env)
    try:
        rid = start_running(system, job)
        system.process.send_signal(signal.SIGTERM)
        assert system.process.wait(30) == 0
    finally:
        stop(system.process)
    assert len(read_log(log)) == 1  # it finished before the system stopped
    with running_system([FIXTURES / "svc.yaml"], store, tmp_path, env=env) as again:
        done = httpx.get(f"{again.url}/api/requests/{rid}", params={"wait": 20}).json()
    assert done["status"] == "COMPLETE" and done["jobs"]["P"]["attempts"] == 1
    assert len(read_log(log)) == 1  # and did not run again


def test_a_job_that_outlasts_the_grace_period_goes_back_to_the_queue(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    store = f"sqlite:///{tmp_path}/bach.db"
    job = {"task": "t", "value": 1, "sleep": 3}
    system = start_system([FIXTURES / "svc.yaml"], store, tmp_path, "--grace", "0.3", env=env)
    try:
        rid = start_running(system, job)
        started = time.monotonic()
        system.process.send_signal(signal.SIGTERM)
        assert system.process.wait(30) == 0
        assert time.monotonic() - started < 3  # it did not wait for the job
    finally:
        stop(system.process)
    assert read_log(log) == []
    with running_system([FIXTURES / "svc.yaml"], store, tmp_path, env=env) as again:
        queued = httpx.get(f"{again.url}/api/requests/{rid}").json()
        assert queued["status"] in ("PENDING", "RUNNING")
        done = httpx.get(f"{again.url}/api/requests/{rid}", params={"wait": 20}, timeout=30).json()
    # Given back, not failed: the same attempt ran again, to the end.
    assert done["status"] == "COMPLETE" and done["jobs"]["P"]["attempts"] == 1
    assert len(read_log(log)) == 1

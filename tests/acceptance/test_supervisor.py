"""The supervisor's worker processes: forked from a template, replaced when they die."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from bach.backends import open_backend
from bach.core.score import load_scores
from bach.runtime.forkserver import ForkServer
from bach.runtime.supervisor import Supervisor
from tests.helpers import FIXTURES, System, kill_all, read_log, running_system

pytestmark = pytest.mark.slow

SCORE = FIXTURES / "scaling.yaml"


def wait_for(predicate: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fork_server(system: System) -> psutil.Process:
    (template,) = [p for p in system.children() if "fork-server" in " ".join(p.cmdline())]
    return template


def states(http: httpx.Client, service: str) -> dict[str, str]:
    return dict(http.get("/api/stats").json()["services"][service]["instance_states"])


def submit(http: httpx.Client, value: int, sleep: float = 0.0) -> str:
    body = {"todo": ["burst"], "input": {"task": "t", "value": value, "sleep": sleep}}
    return str(http.post("/api/requests", json=body).json()["id"])


def status(http: httpx.Client, rid: str) -> str:
    return str(http.get(f"/api/requests/{rid}").json()["status"])


def test_workers_are_forked_from_the_template_and_report_ready(tmp_path: Path) -> None:
    with running_system([SCORE], f"sqlite:///{tmp_path}/bach.db", tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        template = fork_server(system)
        wait_for(lambda: list(states(http, "burst").values()) == ["idle"], "burst ready")
        (worker,) = system.workers()
        assert worker.ppid() == template.pid
        assert worker.cmdline()[0] == "bach worker --service burst"  # what ps shows
        # A cold start is a fork too, and its worker serves the request.
        body = {"todo": ["sleeper"], "input": {"task": "t", "value": 2}}
        done = http.post("/api/requests", params={"wait": 20}, json=body).json()
        assert done["status"] == "COMPLETE"
        assert {p.ppid() for p in system.workers()} == {template.pid}
        http.close()


def test_a_killed_worker_is_replaced_and_its_job_runs_again(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    with running_system([SCORE], f"sqlite:///{tmp_path}/bach.db", tmp_path, env=env) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        wait_for(lambda: len(system.workers()) == 1, "the burst worker")
        (victim,) = system.workers()
        rid = submit(http, 1, sleep=1.0)
        wait_for(
            lambda: http.get(f"/api/requests/{rid}").json()["jobs"]["burst"]["status"] == "RUNNING",
            "the job in hand",
        )
        kill_all([victim])
        wait_for(lambda: status(http, rid) == "COMPLETE", "the request", timeout=30)
        replacements = system.workers()
        assert replacements and victim.pid not in {p.pid for p in replacements}
        # The job ran to its end once, in the replacement (the victim died mid-sleep).
        calls = read_log(log)
        assert [c["pid"] for c in calls] == [replacements[0].pid]
        http.close()


def test_when_the_template_dies_workers_drain_and_new_ones_start_afresh(tmp_path: Path) -> None:
    with running_system([SCORE], f"sqlite:///{tmp_path}/bach.db", tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        wait_for(lambda: len(system.workers()) == 1, "the burst worker")
        (orphan,) = system.workers()
        kill_all([fork_server(system)])
        # The orphan sees its parent gone and stops; the supervisor starts a new worker
        # as a process of its own, which serves requests.
        assert not psutil.wait_procs([orphan], timeout=15)[1], "the orphan did not stop"
        wait_for(lambda: len(system.workers()) == 1, "a new burst worker")
        (fresh,) = system.workers()
        assert fresh.ppid() == system.process.pid
        rid = submit(http, 3)
        wait_for(lambda: status(http, rid) == "COMPLETE", "the request")
        http.close()


def test_without_the_fork_server_workers_are_new_processes(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with running_system([SCORE], store, tmp_path, "--no-fork-server") as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        assert not [p for p in system.children() if "fork-server" in " ".join(p.cmdline())]
        wait_for(lambda: list(states(http, "burst").values()) == ["idle"], "burst ready")
        (worker,) = system.workers()
        assert worker.ppid() == system.process.pid
        rid = submit(http, 4)
        wait_for(lambda: status(http, rid) == "COMPLETE", "the request")
        http.close()


async def test_an_instance_is_starting_until_its_worker_says_it_is_ready(tmp_path: Path) -> None:
    score = load_scores([SCORE])
    store = f"sqlite:///{tmp_path}/bach.db"
    backend = open_backend(store)
    supervisor = Supervisor(score, backend, store, grace=2, fork_server=False)
    try:
        instance = await supervisor.start_instance(score.services["sleeper"])
        # A new Python process takes far longer to import Bach than this takes.
        assert supervisor.states("sleeper", {}) == {instance.ident: "starting"}
        for _ in range(400):
            if supervisor.states("sleeper", {}) == {instance.ident: "idle"}:
                break
            await asyncio.sleep(0.05)
        assert supervisor.states("sleeper", {}) == {instance.ident: "idle"}
        assert 0 < supervisor.startup["sleeper"] < 20
    finally:
        await supervisor.stop()
        await backend.close()
    # Stopped with SIGTERM while idle: it drained and exited cleanly.
    assert instance.process is not None and instance.process.returncode == 0


def test_arrivals_queued_through_another_engine_count_for_scaling(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with (
        running_system([SCORE], store, tmp_path) as supervising,
        running_system([SCORE], store, tmp_path, "--no-workers") as other,
    ):
        http = httpx.Client(base_url=supervising.url, timeout=30)
        front = httpx.Client(base_url=other.url, timeout=30)
        ids = [submit(front, i, sleep=0.01) for i in range(60)]
        # The supervising engine queued none of these, yet sees them arrive and scales.
        rates = []
        while any(status(front, rid) != "COMPLETE" for rid in ids[-1:]):
            rates.append(http.get("/api/stats").json()["services"]["burst"]["arrival_rate"])
            time.sleep(0.1)
        assert max(rates, default=0) > 0, rates
        assert all(status(front, rid) == "COMPLETE" for rid in ids)
        http.close()
        front.close()


def test_two_systems_on_one_store_share_max_instances(tmp_path: Path, shared_store: str) -> None:
    with (
        running_system([SCORE], shared_store, tmp_path) as one,
        running_system([SCORE], shared_store, tmp_path) as two,
    ):
        clients = [httpx.Client(base_url=s.url, timeout=30) for s in (one, two)]

        def counts() -> list[tuple[int, int, int]]:
            out = []
            for http in clients:
                stats = http.get("/api/stats").json()
                burst = stats["services"]["burst"]
                out.append((stats["supervisors"], burst["instances"], burst["instances_elsewhere"]))
            return out

        wait_for(lambda: [c[0] for c in counts()] == [2, 2], "each to see the other")
        assert [c[1] for c in counts()] == [1, 1]  # each keeps its min_instances warm
        ids = [submit(clients[i % 2], i, sleep=0.02) for i in range(300)]
        peak = 0
        while any(status(clients[0], rid) != "COMPLETE" for rid in ids[-5:]):
            ours = [c[1] for c in counts()]
            assert sum(ours) <= 4, ours  # max_instances holds for the system, not each
            peak = max(peak, sum(ours))
            time.sleep(0.1)
        assert peak == 4
        assert all(status(clients[1], rid) == "COMPLETE" for rid in ids)
        for http in clients:
            http.close()


async def test_a_forked_process_that_exits_at_once_is_seen_to_exit() -> None:
    forks = ForkServer()
    await forks.start()
    try:
        child = await forks.spawn(["worker", "--help"])  # prints and exits: no worker
        assert await asyncio.wait_for(child.wait(), 10) == 0
        assert not child.ready.done()  # it never said it was ready
    finally:
        await forks.close()


async def test_readiness_and_exit_that_arrive_before_spawn_resumes_are_kept() -> None:
    # The template's messages for one worker can come in one read: spawned, ready, exited.
    # Each is handled as it is read, before the waiting spawn() gets its turn.
    forks = ForkServer()
    pending = asyncio.get_running_loop().create_future()
    forks._pending[1] = pending
    forks._handle({"spawned": 1, "pid": 4242})
    forks._handle({"ready": 4242})
    forks._handle({"exited": 4242, "status": 3})
    child = await pending
    assert child.ready.done() and child.returncode == 3

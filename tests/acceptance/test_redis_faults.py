"""Faults on a real Redis with real processes: a worker or an engine killed with SIGKILL,
every client connection dropped, the server stalled. No request lost, none stuck, and no
step applied twice except one a killed process had in hand."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from bach.backends.redis import Keys
from bach.runtime.engine import HOST
from tests.conftest import redis_store, redis_url
from tests.helpers import (
    FIXTURES,
    Workers,
    kill_all,
    read_log,
    running_system,
    start_system,
    stop,
)

pytestmark = pytest.mark.slow

SCORE = FIXTURES / "svc.yaml"
TASKS = ("s1", "s2", "s3")
#: Short leases, so a job whose lease reply was lost comes back quickly.
LEASE = "2"

# slow3 with a step on Q that takes long enough to kill its worker in the middle of it.
SLOWQ = """\
rubrics:
  slowq:
    tasks:
      s1: {service: P, input: {task: s1, value: "${input}"}}
      s2: {service: Q, after: [s1], input: {task: s2, value: "${tasks.s1}", sleep: 1.0}}
      s3: {service: R, after: [s2], input: {task: s3, value: "${tasks.s2}"}}
"""

# A busy script: Redis runs nothing else until it returns, like DEBUG SLEEP (which this
# Redis may refuse: enable-debug-command defaults to "no").
STALL = """\
local t0 = redis.call('TIME')
local start = t0[1] * 1000000 + t0[2]
repeat
  local t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000000
return 1
"""


def expected(i: int) -> str:
    return f"s3(s2(s1({i})))"


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def submit(url: str, inputs: Sequence[int], rubric: str = "slow3") -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for i in inputs:
            answer = client.post("/api/requests", json={"rubric": rubric, "input": i})
            assert answer.status_code == 201, answer.text
            ids.append(str(answer.json()["id"]))
        return ids


def finish(url: str, ids: Sequence[str], within: float = 40) -> list[dict[str, Any]]:
    """Every request, once it has ended (or as it is when ``within`` seconds are up)."""
    deadline = time.monotonic() + within
    with httpx.Client(base_url=url, timeout=within + 30) as client:
        found = []
        for rid in ids:
            wait = max(0.0, deadline - time.monotonic())
            answer = client.get(f"/api/requests/{rid}", params={"wait": wait})
            assert answer.status_code == 200, answer.text
            found.append(answer.json())
        return found


def check_results(finished: Sequence[dict[str, Any]], inputs: Sequence[int]) -> None:
    for i, request in zip(inputs, finished, strict=True):
        assert request["status"] == "COMPLETE", request
        assert request["result"] == expected(i), request


def attempts(request: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {name: (job["status"], job["attempts"]) for name, job in request["jobs"].items()}


def calls(log: Path) -> Counter[tuple[str, str]]:
    return Counter((c["task"], str(c["value"])) for c in read_log(log))


def all_steps(inputs: Sequence[int]) -> set[tuple[str, str]]:
    """Every (task, value) the slow3 chain runs for these inputs."""
    steps = set()
    for i in inputs:
        value = str(i)
        for task in TASKS:
            steps.add((task, value))
            value = f"{task}({value})"
    return steps


def workers_ready(prefix: str, count: int, services: Sequence[str] = ("P", "Q", "R")) -> bool:
    """Whether ``count`` workers of each service wait for its jobs (have subscribed to the
    bell rung when they are queued: a worker does that first thing)."""
    client = redis.Redis.from_url(redis_url())
    try:
        bells = [Keys(prefix).bell_jobs(service) for service in services]
        return all(n >= count for _, n in client.pubsub_numsub(*bells))
    finally:
        client.close()


def test_a_worker_killed_mid_job_hands_it_to_its_replacement(
    tmp_path: Path, redis_prefix: str
) -> None:
    store = redis_store(redis_prefix)
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    (tmp_path / "slowq.yaml").write_text(SLOWQ)
    scores = [SCORE, tmp_path / "slowq.yaml"]
    inputs = range(3)
    workers = Workers(store, tmp_path, env, scores, lease=LEASE)
    with running_system(scores, store, tmp_path, "--no-workers", env=env) as system:
        try:
            for service in ("P", "Q", "R"):
                workers.start(service)
            victim = workers.procs[1]
            wait_for(lambda: workers_ready(redis_prefix, 1), "the workers")
            ids = submit(system.url, inputs, rubric="slowq")

            def held_by_victim() -> dict[str, Any] | None:
                for rid in ids:
                    request: dict[str, Any] = httpx.get(f"{system.url}/api/requests/{rid}").json()
                    job = request["jobs"].get("s2", {})
                    if job.get("worker") == f"{HOST}:{victim.pid}:Q":
                        return request
                return None

            held = wait_for(held_by_victim, "the Q worker to take a job")
            time.sleep(0.3)  # well into its 1 s sleep
            assert not [c for c in read_log(log) if c["task"] == "s2"], "s2 ended too soon"
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed_at = time.monotonic()
            replacement = workers.start("Q")
            finished = finish(system.url, ids)
            elapsed = time.monotonic() - killed_at
        finally:
            workers.stop_all()

    check_results(finished, inputs)
    for request in finished:
        # The job the victim held counts its lost attempt (its lease ran out: the worker
        # was on another "host" as far as the engine could tell, or died here).
        lost = 2 if request["id"] == held["id"] else 1
        assert attempts(request) == {
            **{t: ("COMPLETE", 1) for t in TASKS},
            "s2": ("COMPLETE", lost),
        }, request
    victim_job = next(r for r in finished if r["id"] == held["id"])["jobs"]["s2"]
    assert [a["outcome"] for a in victim_job["history"]] == ["lost", "ok"]
    assert victim_job["history"][0]["worker"] == f"{HOST}:{victim.pid}:Q"
    counted = calls(log)
    assert set(counted) == all_steps(inputs)
    # The killed job ran twice: killed before it could log its call, then to the end once.
    assert held["jobs"]["s1"]["result"] in {value for task, value in counted if task == "s2"}
    assert set(counted.values()) == {1}, counted
    # Every s2 ran in the replacement; the three of them took about 3 s after the kill.
    assert {c["pid"] for c in read_log(log) if c["task"] == "s2"} == {replacement.pid}
    assert elapsed < 15


def test_one_engine_killed_the_other_finishes_everything(tmp_path: Path, redis_prefix: str) -> None:
    store = redis_store(redis_prefix)
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log), "BACH_LEASE": LEASE}
    inputs = list(range(40))
    orphans: list[psutil.Process] = []
    with running_system([SCORE], store, tmp_path, env=env) as survivor:
        doomed = start_system([SCORE], store, tmp_path, env=env)
        try:
            wait_for(lambda: workers_ready(redis_prefix, 2), "both systems' workers")
            orphans = doomed.children()
            doomed_pids = {proc.pid for proc in orphans}
            ids = [
                *submit(survivor.url, inputs[0::2]),
                *submit(doomed.url, inputs[1::2]),
            ]
            order = [*inputs[0::2], *inputs[1::2]]

            def going() -> bool:
                done = read_log(log)
                return len(done) >= 20 and any(c["pid"] in doomed_pids for c in done)

            wait_for(going, "work to get going in both systems")
            # Only the serve process dies (engine, API, supervisor); its workers, left
            # without a parent, finish what they hold and stop on their own.
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(10)
            at_kill = len(read_log(log))
            finished = finish(survivor.url, ids)
            _, alive = psutil.wait_procs(orphans, timeout=10)
        finally:
            stop(doomed.process)
            kill_all(orphans)

    assert at_kill < len(inputs) * len(TASKS), "the kill should land mid-flight"
    assert not alive, f"workers of the killed system did not stop: {alive}"
    check_results(finished, order)
    for request in finished:
        assert attempts(request) == {t: ("COMPLETE", 1) for t in TASKS}, request
    counted = calls(log)
    assert set(counted) == all_steps(inputs)
    # No worker was killed, so no job was in the hands of a killed process.
    assert set(counted.values()) == {1}, {job: n for job, n in counted.items() if n > 1}
    # The survivor's workers did the rest of the work.
    assert {c["pid"] for c in read_log(log)} - doomed_pids


def run_with_fault(
    tmp_path: Path, prefix: str, fault: Callable[[], None], requests: int = 60
) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]], int]:
    """Run ``requests`` slow3 requests on one system, with ``fault`` once they flow."""
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log), "BACH_LEASE": LEASE}
    inputs = list(range(requests))
    with running_system([SCORE], redis_store(prefix), tmp_path, env=env) as system:
        wait_for(lambda: workers_ready(prefix, 1), "the workers")
        ids = submit(system.url, inputs)
        wait_for(lambda: len(read_log(log)) >= 5, "work to get going")
        fault()
        after_fault = len(read_log(log))
        finished = finish(system.url, ids)
    check_results(finished, inputs)
    for request in finished:
        assert attempts(request) == {t: ("COMPLETE", 1) for t in TASKS}, request
    counted = calls(log)
    assert set(counted) == all_steps(inputs)
    return finished, counted, after_fault


def test_dropped_connections_lose_nothing_and_run_nothing_twice(
    tmp_path: Path, redis_prefix: str
) -> None:
    admin = redis.Redis.from_url(redis_url())
    killed: list[int] = []

    def drop_connections() -> None:
        for _ in range(3):
            killed.append(admin.client_kill_filter(_type="normal"))
            time.sleep(0.3)

    try:
        _, counted, after_fault = run_with_fault(tmp_path, redis_prefix, drop_connections)
    finally:
        admin.close()
    assert killed[0] > 0, killed  # the system's connections were there to drop
    assert after_fault < 60 * len(TASKS), "the faults should land mid-flight"
    # A job whose lease reply was lost was never run: it comes back when its lease runs
    # out, and runs then, once.
    assert set(counted.values()) == {1}, {job: n for job, n in counted.items() if n > 1}


def test_a_stalled_redis_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, redis_prefix: str
) -> None:
    admin = redis.Redis.from_url(redis_url())
    stalled: list[float] = []

    def stall() -> None:
        started = time.monotonic()
        admin.eval(STALL, 0, "2")
        stalled.append(time.monotonic() - started)

    def stall_in_a_thread() -> None:
        thread = threading.Thread(target=stall)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()

    try:
        _, counted, after_fault = run_with_fault(tmp_path, redis_prefix, stall_in_a_thread)
    finally:
        admin.close()
    assert stalled and stalled[0] >= 2
    assert after_fault < 60 * len(TASKS), "the stall should land mid-flight"
    assert set(counted.values()) == {1}, {job: n for job, n in counted.items() if n > 1}

"""The engine with in-process workers on the memory store: what a user of the runtime
sees, without processes or HTTP in the way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from bach.backends.memory import MemoryBackend
from bach.backends.port import JobRecord, RequestRecord, Transition
from bach.core.machine import JobStatus, Status
from bach.core.score import load_scores
from bach.errors import Conflict, InvalidInput, MappingError, NotFound
from bach.runtime.codec import to_jobs
from bach.runtime.engine import Engine, Submission, is_dead_local_worker, worker_id
from bach.runtime.supervisor import Supervisor
from bach.runtime.worker import MAX_DELIVERIES, Worker
from tests.helpers import EXAMPLES, FIXTURES, read_log


@dataclass
class Harness:
    engine: Engine
    backend: MemoryBackend
    supervisor: Supervisor

    async def run(self, sub: Submission) -> tuple[str, Status]:
        request, _ = await self.engine.submit(sub)
        await self.engine.run_until_idle(timeout=20)
        done = await self.engine.get(request.id)
        return done.id, done.status


@contextlib.asynccontextmanager
async def harness_on(backend: MemoryBackend) -> AsyncIterator[Harness]:
    """An engine and in-process workers for the test scores on a memory store."""
    score = load_scores([FIXTURES / "svc.yaml", EXAMPLES / "arith.yaml"])
    engine = Engine(backend, score)
    supervisor = Supervisor(score, backend, "memory://", in_process=True, grace=2)
    await supervisor.start()
    try:
        yield Harness(engine, backend, supervisor)
    finally:
        await supervisor.stop()


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    monkeypatch.setenv("BACH_TEST_LOG", str(tmp_path / "calls.log"))
    async with harness_on(MemoryBackend()) as harness:
        yield harness


async def test_seed_002_examples(harness: Harness) -> None:
    first, _ = await harness.engine.submit(Submission(input=5, todo=["A", "B"]))
    second, _ = await harness.engine.submit(Submission(input=5, todo=["B", "A"]))
    await harness.engine.run_until_idle()
    one = await harness.engine.get(first.id)
    two = await harness.engine.get(second.id)
    assert (one.status, one.result) == (Status.COMPLETE, 14)
    assert (two.status, two.result) == (Status.COMPLETE, 12)
    assert [(j.task, j.input, j.result) for j in two.jobs.values()] == [("B", 5, 10), ("A", 10, 12)]


async def test_named_rubric_and_client(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input=5, rubric="add_then_double"))
    assert status == Status.COMPLETE
    assert (await harness.engine.get(rid)).result == 14
    rid, status = await harness.run(Submission(input={"size": 3}, client="acme"))
    request = await harness.engine.get(rid)
    assert request.result == "measure(3)" and request.client == "acme"


async def test_diamond_runs_d_once_with_both_results(harness: Harness, tmp_path: Path) -> None:
    rid, status = await harness.run(Submission(input=1, rubric="diamond"))
    assert status == Status.COMPLETE
    assert (await harness.engine.get(rid)).result == "d(['b(a(1))', 'c(a(1))'])"
    calls = [c["task"] for c in read_log(tmp_path / "calls.log")]
    assert sorted(calls) == ["a", "b", "c", "d"]


async def test_failures_are_retried_and_attempts_recorded(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input="x", todo=["flaky"]))
    request = await harness.engine.get(rid)
    assert status == Status.COMPLETE and request.result == "x"
    assert request.jobs["flaky"].attempts == 3


async def test_a_task_that_keeps_failing_fails_the_request_with_its_error(
    harness: Harness,
) -> None:
    rid, status = await harness.run(Submission(input=7, todo=["A", "always_fails", "B"]))
    request = await harness.engine.get(rid)
    assert status == Status.FAILED
    assert request.error is not None and request.error["task"] == "always_fails"
    assert "failed after 2 attempts" in request.error["message"]
    assert "ValueError: cannot handle 9" in request.error["message"]
    assert "B" not in request.jobs  # nothing after the failure ran


async def test_a_program_that_crashes_fails_with_its_stderr(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input=1, todo=["crash"]))
    job = (await harness.engine.get(rid)).jobs["crash"]
    assert status == Status.FAILED and job.status == JobStatus.FAILED
    assert job.error == "program exited with status 3: the disk is on fire"


async def test_a_program_that_prints_garbage_fails_clearly(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input=1, todo=["garbage"]))
    job = (await harness.engine.get(rid)).jobs["garbage"]
    assert status == Status.FAILED
    assert job.error is not None and "not JSON: '<html>not json</html>'" in job.error


async def test_a_handler_that_overruns_its_timeout_fails_and_its_worker_is_replaced(
    harness: Harness,
) -> None:
    rid, status = await harness.run(Submission(input=1, todo=["sleepy"]))
    job = (await harness.engine.get(rid)).jobs["sleepy"]
    assert status == Status.FAILED and job.error == "timed out after 0.3s"
    await harness.supervisor.check()  # the tainted worker left; a fresh one starts
    await harness.supervisor.scale()
    assert sum(i.alive for i in harness.supervisor.instances["sleepy"]) == 1


async def test_a_result_that_is_not_json_fails_without_retrying(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input=1, todo=["unjsonable"]))
    job = (await harness.engine.get(rid)).jobs["unjsonable"]
    assert status == Status.FAILED and job.attempts == 1
    assert job.error is not None and "not JSON-able" in job.error


async def test_one_instance_runs_as_many_jobs_at_once_as_its_concurrency(
    harness: Harness, tmp_path: Path
) -> None:
    for i in range(4):
        sub = Submission(input={"task": "w", "value": i, "sleep": 0.3}, todo=["wide"])
        await harness.engine.submit(sub)
    await harness.engine.run_until_idle(timeout=20)
    calls = sorted(read_log(tmp_path / "calls.log"), key=lambda c: c["start"])
    assert len(calls) == 4 and len({c["pid"] for c in calls}) == 1  # one instance (max 1)
    first_three, fourth = calls[:3], calls[3]
    assert max(c["start"] for c in first_three) < min(c["end"] for c in first_three)  # at once
    assert fourth["start"] >= min(c["end"] for c in first_three)  # a slot had to free first


async def test_same_key_twice_is_one_request(harness: Harness) -> None:
    first, created = await harness.engine.submit(Submission(input=5, todo=["A"], key="o-1"))
    again, created_again = await harness.engine.submit(Submission(input=5, todo=["A"], key="o-1"))
    assert created and not created_again and again.id == first.id and again.input == 5
    assert (await harness.engine.get("o-1")).id == first.id
    for other in (
        Submission(input=9, todo=["A"], key="o-1"),
        Submission(input=5, todo=["B"], key="o-1"),
    ):
        with pytest.raises(Conflict, match=f"key 'o-1' is taken by request {first.id}"):
            await harness.engine.submit(other)


async def test_bad_submissions_are_refused_and_nothing_is_stored(harness: Harness) -> None:
    with pytest.raises(NotFound, match="unknown rubric 'nope'"):
        await harness.engine.submit(Submission(input=1, rubric="nope"))
    with pytest.raises(NotFound, match="unknown client 'nobody'"):
        await harness.engine.submit(Submission(input=1, client="nobody"))
    with pytest.raises(NotFound, match="unknown service 'Z'"):
        await harness.engine.submit(Submission(input=1, todo=["A", "Z"]))
    with pytest.raises(InvalidInput, match="exactly one of"):
        await harness.engine.submit(Submission(input=1, todo=["A"], rubric="diamond"))
    with pytest.raises(MappingError, match=r"input\.size"):
        await harness.engine.submit(Submission(input={"width": 3}, rubric="sized"))
    assert await harness.backend.list_requests() == []


async def test_cancel_withdraws_queued_jobs(tmp_path: Path) -> None:
    score = load_scores([EXAMPLES / "arith.yaml"])
    backend = MemoryBackend()
    engine = Engine(backend, score)  # no workers: the job stays queued
    request, _ = await engine.submit(Submission(input=5, todo=["A", "B"]))
    cancelled = await engine.cancel(request.id)
    assert cancelled.status == Status.CANCELLED
    assert cancelled.jobs["A"].status == JobStatus.CANCELLED
    queue = (await backend.stats(0)).queues["A"]
    assert (queue.queued, queue.running, queue.enqueued) == (0, 0, 1)  # queued once, withdrawn


async def test_a_job_delivered_too_often_is_failed_not_run_again(tmp_path: Path) -> None:
    score = load_scores([EXAMPLES / "arith.yaml"])
    backend = MemoryBackend()
    engine = Engine(backend, score)
    request, _ = await engine.submit(Submission(input=5, todo=["A"]))
    for _ in range(MAX_DELIVERIES):  # workers that die holding it
        assert await backend.lease("A", "dying", 1e12, 0.001)
        await backend.requeue_expired(2e12)
    worker = Worker(backend, score.services["A"], ident="w")
    task = asyncio.create_task(worker.run())
    await engine.run_until_idle(timeout=10)
    worker.stop()
    await task
    done = await engine.get(request.id)
    assert done.status == Status.FAILED
    assert done.jobs["A"].error is not None and "5 times without a result" in done.jobs["A"].error


async def test_the_engine_gives_back_jobs_of_local_workers_that_died() -> None:
    backend = MemoryBackend()
    engine = Engine(backend, load_scores([EXAMPLES / "arith.yaml"]))
    job = JobRecord("r/a/1", "r", "a", 1, "A", "1", 0, 30)
    await backend.create(RequestRecord("r", "r", "PENDING", 0, "p", "{}", 0, 0), "p", "{}", [job])
    dead = worker_id("A", pid=2**22 + 12345)  # beyond pid_max: no such process
    await backend.lease("A", dead, 0, 600)
    assert is_dead_local_worker(dead) and not is_dead_local_worker(worker_id("A"))
    await engine.sweep()
    assert len(await backend.lease("A", "w2", 0, 10)) == 1


async def test_retention_forgets_ended_requests_at_the_sweep(harness: Harness) -> None:
    rid, status = await harness.run(Submission(input=5, todo=["A"]))
    assert status == Status.COMPLETE
    harness.engine.retain = 3600.0
    await harness.engine.sweep()
    assert (await harness.engine.get(rid)).id == rid  # ended just now: kept
    harness.engine.clock = lambda: time.time() + 7200
    await harness.engine.sweep()
    with pytest.raises(NotFound):
        await harness.engine.get(rid)


async def test_a_request_stored_whole_by_an_earlier_version_runs_on(harness: Harness) -> None:
    """Before requests were stored in parts, one body held everything: such a request,
    caught mid-run by an upgrade, finishes, and its next step writes it in parts."""
    engine = harness.engine
    request, plan, dispatches = engine._accept(Submission(input=5, todo=["A", "B"]), None)
    whole = RequestRecord(
        request.id,
        request.key,
        request.status.value,
        request.version,
        plan.digest,
        json.dumps(request.to_dict()),
        request.created_at,
        request.updated_at,
        request.remaining(),
    )
    await harness.backend.create(
        whole, plan.digest, json.dumps(plan.to_dict()), to_jobs(dispatches)
    )
    await engine.run_until_idle()
    done = await engine.get(request.id)
    assert (done.status, done.result) == (Status.COMPLETE, 14)
    stored = await harness.backend.load(request.id)
    assert stored is not None and stored.parts is not None
    assert set(stored.parts) == {"input", "job:A", "job:B"} and '"jobs"' not in stored.body


class Recording(MemoryBackend):
    """The memory store, noting what the engine reads and writes of each request."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, ...]] = []
        self.writes: list[tuple[str, ...]] = []

    async def load_many(
        self, ids: Sequence[str], since: Mapping[str, int] | None = None
    ) -> dict[str, RequestRecord]:
        found = await super().load_many(ids, since)
        self.reads += [tuple(sorted(r.parts or {})) for r in found.values()]
        return found

    async def commit(self, transitions: Sequence[Transition]) -> list[bool]:
        self.writes += [tuple(sorted(t.record.parts or {})) for t in transitions if t.record]
        return await super().commit(transitions)


async def test_a_step_reads_and_writes_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACH_TEST_LOG", str(tmp_path / "calls.log"))
    backend = Recording()
    async with harness_on(backend) as harness:
        engine = harness.engine
        request, _ = await engine.submit(Submission(input=5, todo=["A", "B", "A", "B"]))
        await engine.run_until_idle()
        assert (await engine.get(request.id)).result == 32
        # The engine wrote every version itself: it never read a part back.
        assert backend.reads == []
        # Each step wrote the job that finished and the one it dispatched, never the input.
        assert backend.writes == [
            ("job:A", "job:B"),
            ("job:A#2", "job:B"),
            ("job:A#2", "job:B#2"),
            ("job:B#2",),
        ]
        # A second engine, holding nothing, reads the request once, whole.
        other = Engine(backend, engine.score)
        second, _ = await engine.submit(Submission(input=1, todo=["A", "B"]))
        await other.run_until_idle()
        assert (await other.get(second.id)).result == 6
        assert backend.reads == [("input", "job:A")]

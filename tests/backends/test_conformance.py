"""Every backend keeps the same promises. Runs on each backend in conftest.BACKENDS."""

from __future__ import annotations

import asyncio
import pkgutil
import time

import bach.backends
from bach.backends.port import Backend, JobRecord, Report, RequestRecord, Transition
from tests.conftest import BACKENDS

NOW = 1_000_000.0


def record(
    rid: str,
    key: str | None = None,
    status: str = "PENDING",
    version: int = 0,
    created: float = NOW,
    to_run: int = 0,
    parts: dict[str, str] | None = None,
) -> RequestRecord:
    return RequestRecord(
        rid,
        key or rid,
        status,
        version,
        "plan1",
        f'{{"v": {version}}}',
        created,
        created,
        to_run,
        {"input": "1"} if parts is None else parts,
    )


def job(rid: str, task: str, service: str = "A", attempt: int = 1, at: float = NOW) -> JobRecord:
    return JobRecord(f"{rid}/{task}/{attempt}", rid, task, attempt, service, '{"x": 1}', at, 30.0)


def report(j: JobRecord, ok: bool = True, payload: str = "7", elapsed: float = 0.0) -> Report:
    return Report(j.id, j.request_id, j.task, j.attempt, ok, payload, "w1", NOW, True, elapsed)


async def test_every_backend_module_is_in_the_conformance_suite() -> None:
    modules = {m.name for m in pkgutil.iter_modules(bach.backends.__path__)}
    implementations = modules - {"port"} - {m for m in modules if m.startswith("_")}
    assert implementations == set(BACKENDS)


async def test_create_then_load_by_id_and_by_key(backend: Backend) -> None:
    stored, created = await backend.create(record("r1", "order-7"), "plan1", "{}", [])
    assert created and stored.id == "r1"
    assert await backend.load("r1") == stored
    assert await backend.load("order-7") == stored
    assert await backend.load("nope") is None
    assert await backend.plan("plan1") == "{}"


async def test_same_key_twice_returns_the_first_request(backend: Backend) -> None:
    first, _ = await backend.create(record("r1", "k"), "plan1", "{}", [job("r1", "a")])
    again, created = await backend.create(record("r2", "k"), "plan1", "{}", [job("r2", "a")])
    assert not created and again == first
    assert await backend.load("r2") is None
    leases = await backend.lease("A", "w1", NOW, 30, limit=10)
    assert [lease.job.request_id for lease in leases] == ["r1"]


async def test_lease_hands_out_each_job_once_oldest_first(backend: Backend) -> None:
    jobs = [
        job("r1", "a", at=NOW - 2),
        job("r1", "b", at=NOW - 3),
        job("r1", "c", at=NOW + 60),
        job("r1", "d", service="B"),
    ]
    await backend.create(record("r1"), "plan1", "{}", jobs)
    first = await backend.lease("A", "w1", NOW, 30)
    second = await backend.lease("A", "w2", NOW, 30, limit=5)
    assert [lease.job.task for lease in first] == ["b"]
    assert [lease.job.task for lease in second] == ["a"]  # c is not due yet, d is B's
    assert first[0].deliveries == 1 and first[0].until == NOW + 30
    assert first[0].job == jobs[1]
    assert await backend.lease("A", "w3", NOW, 30) == []
    assert [lease.job.task for lease in await backend.lease("A", "w3", NOW + 61, 30)] == ["c"]


async def test_expired_lease_goes_back_to_its_queue(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a")])
    [lease] = await backend.lease("A", "w1", NOW, 10)
    assert await backend.requeue_expired(NOW + 5) == 0
    assert await backend.lease("A", "w2", NOW + 5, 10) == []
    assert await backend.requeue_expired(NOW + 11) == 1
    [again] = await backend.lease("A", "w2", NOW + 11, 10)
    assert again.job == lease.job and again.deliveries == 2 and again.worker == "w2"
    assert await backend.extend([again.job.id], "w1", NOW + 100) == [again.job.id]
    assert await backend.extend([again.job.id], "w2", NOW + 100) == []
    assert await backend.requeue_expired(NOW + 50) == 0  # extended


async def test_leased_names_the_tasks_workers_hold(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a"), job("r1", "b")])
    assert await backend.leased("r1") == {}
    await backend.lease("A", "w1", NOW, 10)
    assert await backend.leased("r1") == {"a": "w1"}


async def test_release_gives_a_job_back_without_counting_it(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a")])
    [lease] = await backend.lease("A", "w1", NOW, 10)
    assert await backend.release([lease.job.id], "w2") == 0  # not w2's to give
    assert await backend.release([lease.job.id], "w1") == 1
    [again] = await backend.lease("A", "w2", NOW, 10)
    assert again.deliveries == 1


async def test_release_worker_requeues_all_it_held(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a"), job("r1", "b")])
    await backend.lease("A", "dead", NOW, 600, limit=2)
    assert (await backend.stats(NOW)).workers == {"dead": 2}
    assert await backend.release_worker("dead") == 2
    assert len(await backend.lease("A", "w2", NOW, 10, limit=5)) == 2


async def test_report_acks_the_job_and_feeds_the_completion_channel(backend: Backend) -> None:
    j = job("r1", "a")
    await backend.create(record("r1"), "plan1", "{}", [j])
    await backend.lease("A", "w1", NOW, 10)
    await backend.report([report(j, elapsed=0.25)])
    await backend.report([report(j)])  # a duplicate collapses into the first
    assert await backend.requeue_expired(NOW + 100) == 0  # acked: never redelivered
    assert await backend.lease("A", "w2", NOW + 100, 10) == []
    # The job's measured run time comes back with it (the service-time EWMA's input).
    assert await backend.reports(10) == [report(j, elapsed=0.25)]


async def test_commit_applies_state_jobs_and_consumed_reports_atomically(backend: Backend) -> None:
    a = job("r1", "a")
    await backend.create(record("r1"), "plan1", "{}", [a])
    await backend.lease("A", "w1", NOW, 10)
    await backend.report([report(a)])
    b = job("r1", "b", service="B")
    step = Transition("r1", 0, record("r1", status="RUNNING", version=1), (b,), (a.id,))
    assert await backend.commit([step]) == [True]
    loaded = await backend.load("r1")
    assert loaded is not None and loaded.version == 1 and loaded.status == "RUNNING"
    assert await backend.reports(10) == []
    assert [lease.job for lease in await backend.lease("B", "w1", NOW, 10)] == [b]


async def test_commit_at_a_stale_version_changes_nothing(backend: Backend) -> None:
    a = job("r1", "a")
    await backend.create(record("r1"), "plan1", "{}", [a])
    await backend.report([report(a)])
    first = Transition("r1", 0, record("r1", status="RUNNING", version=1), (), (a.id,))
    stale = Transition(
        "r1", 0, record("r1", status="FAILED", version=1), (job("r1", "x", service="X"),), (a.id,)
    )
    assert await backend.commit([first]) == [True]
    await backend.report([report(a)])  # the same report again, from a slow duplicate
    assert await backend.commit([stale]) == [False]
    loaded = await backend.load("r1")
    assert loaded is not None and loaded.status == "RUNNING"
    assert await backend.lease("X", "w1", NOW, 10) == []
    assert len(await backend.reports(10)) == 1  # not consumed by the failed commit


async def test_commits_in_one_call_are_independent(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [])
    await backend.create(record("r2"), "plan1", "{}", [])
    results = await backend.commit(
        [
            Transition("r1", 5, record("r1", version=6)),
            Transition("r2", 0, record("r2", status="COMPLETE", version=1)),
        ]
    )
    assert results == [False, True]
    r2 = await backend.load("r2")
    assert r2 is not None and r2.status == "COMPLETE"


async def test_a_commit_writes_only_the_parts_it_carries(backend: Backend) -> None:
    # 9,000 parts: more than one slice of a Lua call's arguments
    parts = {"input": '{"big": 1}', **{f"job:t{i}": f'{{"n": {i}}}' for i in range(9000)}}
    await backend.create(record("r1", parts=parts), "plan1", "{}", [])
    step = record("r1", status="RUNNING", version=1, parts={"job:t5": '{"n": "five"}'})
    assert await backend.commit([Transition("r1", 0, step)]) == [True]
    step = record("r1", status="RUNNING", version=2, parts={"job:new": "[]"})
    assert await backend.commit([Transition("r1", 1, step)]) == [True]
    loaded = await backend.load("r1")
    assert loaded is not None and loaded.version == 2 and loaded.body == '{"v": 2}'
    assert loaded.parts == {**parts, "job:t5": '{"n": "five"}', "job:new": "[]"}


async def test_a_reader_at_one_version_reads_only_the_parts_written_since(
    backend: Backend,
) -> None:
    await backend.create(
        record("r1", parts={"input": "1", "job:a": "1", "job:b": "1"}), "plan1", "{}", []
    )
    await backend.create(record("r2", parts={"input": "2"}), "plan1", "{}", [])
    for version, part in ((1, "job:a"), (2, "job:b"), (3, "job:a")):
        step = record("r1", status="RUNNING", version=version, parts={part: str(version)})
        assert await backend.commit([Transition("r1", version - 1, step)]) == [True]
    found = await backend.load_many(["r1", "r2", "gone"], since={"r1": 1})
    assert set(found) == {"r1", "r2"}
    assert found["r1"].version == 3 and found["r1"].parts == {"job:a": "3", "job:b": "2"}
    assert found["r2"].parts == {"input": "2"}  # not in since: every part
    current = await backend.load_many(["r1"], since={"r1": 3})
    assert current["r1"].parts == {} and current["r1"].body == '{"v": 3}'


async def test_listings_and_the_report_channel_carry_headers_only(backend: Backend) -> None:
    a = job("r1", "a")
    await backend.create(record("r1", parts={"input": "[1]", "job:a": "{}"}), "plan1", "{}", [a])
    await backend.report([report(a)])
    _, requests = await backend.reports_with_requests(10)
    assert requests["r1"].parts is None and requests["r1"].body == '{"v": 0}'
    [listed] = await backend.list_requests()
    assert listed.parts is None and listed.id == "r1"


async def test_purge_forgets_a_request_with_its_parts(backend: Backend) -> None:
    await backend.create(record("r1", parts={"input": "1", "job:a": "2"}), "plan1", "{}", [])
    done = record("r1", status="COMPLETE", version=1, parts={"job:a": "3"})
    await backend.commit([Transition("r1", 0, done)])
    assert await backend.purge(NOW + 1) == 1
    assert await backend.load("r1") is None
    assert await backend.load_many(["r1"]) == {}


async def test_withdraw_removes_queued_and_leased_jobs(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a"), job("r1", "b")])
    [held] = await backend.lease("A", "w1", NOW, 10)
    await backend.commit(
        [Transition("r1", 0, record("r1", status="CANCELLED", version=1), withdraw=True)]
    )
    assert await backend.lease("A", "w2", NOW, 10) == []
    # the holder learns at its next heartbeat that the job is no longer its to run
    assert await backend.extend([held.job.id], "w1", NOW + 20) == [held.job.id]
    stats = await backend.stats(NOW)
    assert stats.queues["A"].running == 0 and stats.workers == {}


async def test_a_lost_delivery_is_noted_on_the_job_and_a_give_back_is_not(
    backend: Backend,
) -> None:
    await backend.create(record("r1"), "plan1", "{}", [job("r1", "a")])
    await backend.lease("A", "w1", NOW, 10)
    assert await backend.requeue_expired(NOW + 11) == 1
    [second] = await backend.lease("A", "w2", NOW + 12, 10)
    assert await backend.release_worker("w2") == 1
    [third] = await backend.lease("A", "w3", NOW + 13, 10)
    await backend.release([third.job.id], "w3")
    [fourth] = await backend.lease("A", "w4", NOW + 14, 10)
    assert [(x["worker"], x["reason"]) for x in fourth.lost] == [
        ("w1", "lease expired"),
        ("w2", "worker died"),
    ]
    assert fourth.lost[0]["at"] == NOW + 11 and second.lost[0]["worker"] == "w1"
    assert fourth.deliveries == 3


async def test_list_newest_first_by_status(backend: Backend) -> None:
    for i in range(5):
        status = "COMPLETE" if i % 2 else "PENDING"
        await backend.create(record(f"r{i}", status=status, created=NOW + i), "plan1", "{}", [])
    assert [r.id for r in await backend.list_requests()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.id for r in await backend.list_requests("COMPLETE")] == ["r3", "r1"]
    assert [r.id for r in await backend.list_requests(limit=2)] == ["r4", "r3"]
    assert [r.id for r in await backend.list_requests(before=NOW + 2)] == ["r1", "r0"]
    assert set(await backend.load_many(["r1", "r3", "zz"])) == {"r1", "r3"}


async def test_stats_count_requests_and_queues(backend: Backend) -> None:
    jobs = [
        job("r1", "a", at=NOW - 5),
        job("r1", "b"),
        job("r1", "c", at=NOW + 9),
        job("r1", "d", service="B"),
    ]
    await backend.create(record("r1", status="RUNNING"), "plan1", "{}", jobs)
    await backend.create(record("r2", status="COMPLETE"), "plan1", "{}", [])
    await backend.lease("B", "w1", NOW, 10)
    stats = await backend.stats(NOW)
    assert stats.requests == {"RUNNING": 1, "COMPLETE": 1}
    assert stats.queues["A"].queued == 2 and stats.queues["A"].delayed == 1
    assert stats.queues["A"].oldest_queued_at == NOW - 5
    assert stats.queues["B"].running == 1 and stats.queues["B"].queued == 0
    assert stats.workers == {"w1": 1}


async def test_stats_count_arrivals_and_outcomes_once_each(backend: Backend) -> None:
    a, b = job("r1", "a"), job("r1", "b")
    await backend.create(record("r1"), "plan1", "{}", [a, b])
    await backend.create(record("r1"), "plan1", "{}", [a, b])  # the same request again
    [lease] = await backend.lease("A", "w1", NOW, 10)
    await backend.release([lease.job.id], "w1")  # back on the queue: not a new arrival
    [lease] = await backend.lease("A", "w1", NOW, 10)
    await backend.report([report(lease.job, ok=False, payload="boom")])
    retry = job("r1", "a", attempt=2)
    step = Transition("r1", 0, record("r1", version=1), (retry,), (lease.job.id,))
    assert await backend.commit([step]) == [True]
    [again] = await backend.lease("A", "w1", NOW, 10)
    await backend.report([report(again.job)])
    await backend.report([report(again.job)])  # a duplicate is not a second outcome
    stats = await backend.stats(NOW)
    a_stats = stats.queues["A"]
    assert a_stats.enqueued == 3  # a, b and a's second attempt
    assert (a_stats.completed, a_stats.failed) == (1, 1)
    assert "B" not in stats.queues


async def test_stats_sum_the_tasks_still_to_run_as_records_change(backend: Backend) -> None:
    await backend.create(record("r1", to_run=3), "plan1", "{}", [])
    await backend.create(record("r2", to_run=2), "plan1", "{}", [])
    await backend.create(record("r9", key="r1", to_run=7), "plan1", "{}", [])  # known key
    assert (await backend.stats(NOW)).to_run == 5
    assert await backend.commit([Transition("r1", 0, record("r1", version=1, to_run=1))]) == [True]
    stale = Transition("r1", 0, record("r1", version=1, to_run=0))
    assert await backend.commit([stale]) == [False]
    ended = record("r2", status="COMPLETE", version=1, created=NOW - 100, to_run=0)
    assert await backend.commit([Transition("r2", 0, ended)]) == [True]
    loaded = await backend.load("r1")
    assert loaded is not None and loaded.to_run == 1
    assert (await backend.stats(NOW)).to_run == 1
    await backend.purge(NOW + 1)
    assert (await backend.stats(NOW)).to_run == 1


async def test_supervisors_announce_themselves_and_see_each_other(backend: Backend) -> None:
    assert await backend.announce("s1", {"A": 2}, NOW + 5, NOW) == {"s1": {"A": 2}}
    seen = await backend.announce("s2", {"A": 1, "B": 0}, NOW + 5, NOW)
    assert seen == {"s1": {"A": 2}, "s2": {"A": 1, "B": 0}}
    # s1 says nothing more: once its time is up, it is gone; s2's new figures replace its old.
    assert await backend.announce("s2", {"A": 3}, NOW + 10, NOW + 6) == {"s2": {"A": 3}}
    assert await backend.announce("s2", {}, NOW + 6, NOW + 7) == {}  # withdrawn


async def test_waiting_for_jobs_wakes_on_enqueue(backend: Backend) -> None:
    await backend.create(record("r1"), "plan1", "{}", [])
    assert await backend.lease("A", "w1", NOW, 10) == []  # starts listening
    started = time.monotonic()
    waiter = asyncio.create_task(backend.wait_jobs("A", 5.0))
    await asyncio.sleep(0.05)
    await backend.commit([Transition("r1", 0, None, (job("r1", "a"),))])
    await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - started < 2.0


async def test_waiting_for_reports_wakes_on_report(backend: Backend) -> None:
    j = job("r1", "a")
    await backend.create(record("r1"), "plan1", "{}", [j])
    waiter = asyncio.create_task(backend.wait_reports(5.0))
    await asyncio.sleep(0.05)
    await backend.report([report(j)])
    await asyncio.wait_for(waiter, 2.0)


async def test_waiting_times_out_when_nothing_comes(backend: Backend) -> None:
    started = time.monotonic()
    await backend.wait_jobs("A", 0.1)
    assert 0.05 < time.monotonic() - started < 2.0


async def test_purge_forgets_ended_requests_older_than_the_cutoff(backend: Backend) -> None:
    await backend.create(
        record("old", "k-old", status="COMPLETE", created=NOW - 100), "plan1", "{}", []
    )
    await backend.create(record("new", "k-new", status="COMPLETE", created=NOW), "plan1", "{}", [])
    await backend.create(record("live", status="RUNNING", created=NOW - 100), "plan1", "{}", [])
    assert await backend.purge(NOW - 50) == 1
    assert await backend.load("old") is None and await backend.load("k-old") is None
    assert {r.id for r in await backend.list_requests()} == {"new", "live"}
    assert (await backend.stats(NOW)).requests == {"COMPLETE": 1, "RUNNING": 1}
    # the key is free again
    _, created = await backend.create(record("again", "k-old"), "plan1", "{}", [])
    assert created


async def test_a_report_keeps_what_the_worker_recorded(backend: Backend) -> None:
    a = job("r1", "a")
    await backend.create(record("r1"), "plan1", "{}", [a])
    await backend.lease("A", "w1", NOW, 10)
    info = '{"error": {"type": "ValueError", "traceback": "Traceback ...\\n"}}'
    sent = Report(a.id, "r1", "a", 1, False, "ValueError: x", "w1", NOW, True, 0.5, info)
    await backend.report([sent])
    assert await backend.reports(10) == [sent]


async def test_workers_are_present_until_their_time_runs_out_or_they_leave(
    backend: Backend,
) -> None:
    await backend.present("h:1:A", '{"pid": 1}', NOW + 5, NOW)
    await backend.present("h:2:B", '{"pid": 2}', NOW + 1, NOW)
    assert await backend.present_workers(NOW) == {"h:1:A": '{"pid": 1}', "h:2:B": '{"pid": 2}'}
    assert await backend.present_workers(NOW + 2) == {"h:1:A": '{"pid": 1}'}  # 2 went quiet
    await backend.present("h:1:A", '{"pid": 1}', 0.0, NOW + 3)  # 1 stopped
    assert await backend.present_workers(NOW + 3) == {}

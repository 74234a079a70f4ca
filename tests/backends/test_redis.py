"""What only the Redis backend promises: namespaces, cross-process wake-ups, reconnects."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from bach.backends import open_backend
from bach.backends.port import Backend, Report, Transition
from bach.backends.redis import _report, parse_url
from bach.errors import StoreError
from tests.backends.test_conformance import NOW, job, record, report
from tests.conftest import drop_prefix, redis_store, redis_url


@pytest.fixture
async def pair(redis_prefix: str) -> AsyncIterator[tuple[Backend, Backend]]:
    """Two connections to one system, as two processes would have."""
    one, two = open_backend(redis_store(redis_prefix)), open_backend(redis_store(redis_prefix))
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_two_prefixes_share_one_redis_without_seeing_each_other(redis_prefix: str) -> None:
    other_prefix = f"{redis_prefix}-other"
    mine, other = open_backend(redis_store(redis_prefix)), open_backend(redis_store(other_prefix))
    try:
        await mine.create(record("r1", "same-key"), "plan1", "{}", [job("r1", "a")])
        _, created = await other.create(record("r2", "same-key"), "plan1", "{}", [job("r2", "a")])
        assert created  # the key is only taken in the other namespace
        assert await other.load("r1") is None
        [lease] = await other.lease("A", "w1", NOW, 10, limit=5)
        assert lease.job.request_id == "r2"
    finally:
        await mine.close()
        await other.close()
        drop_prefix(other_prefix)


async def test_a_request_ended_by_one_process_is_announced_to_another(
    pair: tuple[Backend, Backend],
) -> None:
    one, two = pair
    await one.create(record("r1"), "plan1", "{}", [])
    assert await two.wait_ended(0.05) == []  # subscribes
    await one.commit([Transition("r1", 0, record("r1", status="COMPLETE", version=1))])
    assert await two.wait_ended(2.0) == ["r1"]


async def test_arrivals_count_what_every_engine_queued(pair: tuple[Backend, Backend]) -> None:
    one, two = pair
    await one.create(record("r1"), "plan1", "{}", [job("r1", "a")])
    await two.create(record("r2"), "plan1", "{}", [job("r2", "a"), job("r2", "b")])
    for backend in pair:
        assert (await backend.stats(NOW)).queues["A"].enqueued == 3


async def test_a_worker_in_another_process_is_woken_by_an_enqueue(
    pair: tuple[Backend, Backend],
) -> None:
    engine, worker = pair
    await engine.create(record("r1"), "plan1", "{}", [])
    assert await worker.lease("A", "w1", NOW, 10) == []
    waiter = asyncio.create_task(worker.wait_jobs("A", 5.0))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await engine.commit([Transition("r1", 0, None, (job("r1", "a"),))])
    await asyncio.wait_for(waiter, 2.0)
    assert loop.time() - started < 1.0
    assert len(await worker.lease("A", "w1", NOW, 10)) == 1


async def test_dropped_connections_are_reopened_and_nothing_is_lost(
    pair: tuple[Backend, Backend], redis_prefix: str
) -> None:
    one, two = pair
    a = job("r1", "a")
    await one.create(record("r1"), "plan1", "{}", [a])
    assert len(await two.lease("A", "w1", NOW, 10)) == 1
    admin = redis.Redis.from_url(redis_url())
    ours = [c for c in admin.client_list() if c["name"] == f"bach:{redis_prefix}"]
    assert len(ours) >= 2
    for client in ours:  # every connection of this system, pub/sub included
        admin.client_kill_filter(_id=client["id"])
    await two.report([report(a)])  # on a new connection
    assert await one.reports(10) == [report(a)]
    assert await one.load("r1") is not None


def test_prefix_and_url_options() -> None:
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", "bach", 20)
    assert parse_url("redis://h:1/2?prefix=shop&socket_timeout=5&retries=3") == (
        "redis://h:1/2?socket_timeout=5",
        "shop",
        3,
    )
    with pytest.raises(StoreError, match="prefix"):
        parse_url("redis://h:1/2?prefix=a*b")
    with pytest.raises(StoreError, match="retries"):
        parse_url("redis://h:1/2?retries=many")


async def test_an_unreachable_redis_is_a_store_error_naming_it() -> None:
    store = open_backend(f"redis://127.0.0.1:1/0?prefix=x{uuid.uuid4().hex[:6]}&retries=2")
    try:
        with pytest.raises(StoreError, match="unreachable"):
            await asyncio.wait_for(store.load("r1"), 60)
    finally:
        await store.close()


async def test_first_waits_on_several_bells_at_once_all_get_their_rings(
    pair: tuple[Backend, Backend],
) -> None:
    # An engine starts watching reports and ended requests at the same moment; both
    # subscriptions must end up on the connection that is read.
    one, two = pair
    await asyncio.gather(one.wait_ended(0.01), one.wait_reports(0.01), one.wait_jobs("A", 0.01))
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(one.wait_reports(5.0))
    await asyncio.sleep(0.02)
    started = loop.time()
    await two.report([report(job("r1", "a"))])
    await waiter
    assert loop.time() - started < 1.0


def test_a_report_written_before_job_durations_still_reads() -> None:
    old = '["r1/a/1", "r1", "a", 1, true, "7", "w1", 5.0, true]'
    assert _report(old) == Report("r1/a/1", "r1", "a", 1, True, "7", "w1", 5.0, True, 0.0)


async def test_purge_leaves_no_key_of_the_request_behind(redis_prefix: str) -> None:
    store = open_backend(redis_store(redis_prefix))
    try:
        parts = {"input": "1", "job:a": "2"}
        await store.create(record("r1", parts=parts), "plan1", "{}", [job("r1", "a")])
        await store.report([report(job("r1", "a"))])
        done = record("r1", status="COMPLETE", version=1, parts={"job:a": "3"})
        await store.commit([Transition("r1", 0, done, consumed=(job("r1", "a").id,))])
        assert await store.purge(NOW + 1) == 1
        client = redis.Redis.from_url(redis_url())
        left = [k.decode() for k in client.scan_iter(f"{redis_prefix}:*r1*")]
        client.close()
        assert left == []
    finally:
        await store.close()

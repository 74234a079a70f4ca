"""The Redis backend: every engine, API and worker process, on any host, shares one Redis.

URL: ``redis://host:port/db?prefix=NAME&retries=N`` (``rediss://`` for TLS; other query
options go to redis-py). ``prefix`` (default ``bach``) namespaces every key, so two
systems can share one Redis; connections are named ``bach:<prefix>`` in CLIENT LIST.
Needs a standalone Redis (or a primary): the scripts touch keys they compute from the
prefix, which a Redis Cluster would refuse.

Key layout, for prefix ``p`` (every key name Bach uses is built in ``LAYOUT`` below, for
Python and for the Lua scripts alike):

=============================  ======  ================================================
``p:req:<request id>``         hash    the request's header: id, key, status, version,
                                       plan_id, body, created_at, updated_at, to_run
``p:parts:<request id>``       hash    its parts: name (``input``, ``job:<task>``) -> JSON
``p:pver:<request id>``        zset    part names by the version that last wrote them
``p:keys``                     hash    tracking key -> request id
``p:plans``                    hash    plan digest -> plan JSON
``p:created``                  zset    request ids by created_at (listing, newest first)
``p:status:<STATUS>``          zset    request ids with that status, by created_at
``p:ended``                    zset    ended requests by updated_at (retention)
``p:job:<job id>``             hash    one job: its record, plus worker, until, deliveries
``p:queue:<service>``          zset    queued job ids by available_at (due when <= now)
``p:running:<service>``        set     that service's leased job ids
``p:services``                 set     service names that have had jobs
``p:counts``                   hash    ``<service>:enqueued|completed|failed`` -> jobs ever
                                       queued (arrival rates) and reported ok / not ok
``p:leases``                   zset    leased job ids by lease end (expiry sweep)
``p:held:<worker>``            set     job ids a worker holds
``p:workers``                  set     workers holding at least one job
``p:rjobs:<request id>``       set     a request's jobs not yet reported (withdraw)
``p:reports``                  hash    job id -> report JSON (the completion channel)
``p:outbox``                   zset    reported job ids by arrival order
``p:seq``                      string  arrival counter for ``p:outbox``
``p:totals``                   hash    ``to_run`` -> sum of the requests' ``to_run`` fields
``p:supervisors``              hash    supervisor id -> JSON [alive until, {service: instances}]
``p:present``                  hash    worker id -> JSON [alive until, info]
``p:bell:jobs:<service>``      chan    published when that service's jobs are queued
``p:bell:reports``             chan    published when reports arrive
``p:bell:ended``               chan    a request's id, published when it ends
=============================  ======  ================================================

Why sorted sets and not Streams or lists: a queued job carries the time it becomes due
(retries wait out their backoff in the queue), which a sorted set orders for free and a
stream or list cannot hold back; a lease must be one atomic step with the request's job
set and the lease index, which a Lua script gives and XREADGROUP cannot join; and a lease
expires at its own deadline (``p:leases``), pushed out by the holder's heartbeat, rather
than at a consumer group's idle time. Idle workers still cost nothing: they block on a
pub/sub subscription to their service's bell, and every script that queues a job rings
it (a worker that misses a ring still looks again after its poll interval).

Every method is one Lua script (or a read-only pipeline), so a transition is atomic
across processes. ``commit`` applies a request's new state only if its version is the
one it was read at, and enqueues the jobs that became ready and drops the reports it
consumed in the same script.

When Redis goes away, calls retry with capped exponential backoff (about 16 s in all;
``?retries=N`` changes the count) before they fail; the engine and workers then keep
retrying on their own, and workers keep their results until a report is acknowledged.
A script whose reply was lost may be retried: ``create`` then finds its own key,
``report`` collapses duplicates, ``commit`` finds the version moved (and the engine
reads again), and jobs a lost ``lease`` reply handed out come back when their lease
runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bach.backends import redact_url
from bach.backends._redis_scripts import (
    _ANNOUNCE,
    _COMMIT,
    _CREATE,
    _EXTEND,
    _LEASE,
    _LEASED,
    _LOAD,
    _LOAD_MANY,
    _PURGE,
    _RELEASE,
    _RELEASE_WORKER,
    _REPORT,
    _REPORTS,
    _REQUEUE_EXPIRED,
    _STATS,
    REQUEST_FIELDS,
    Keys,
)
from bach.backends.port import (
    JobRecord,
    Lease,
    QueueStats,
    Report,
    RequestRecord,
    Stats,
    Transition,
)
from bach.errors import StoreError

log = logging.getLogger("bach.redis")

DEFAULT_PREFIX = "bach"
#: Retries of a call while Redis is away: with backoff capped at 1 s, about 16 s in all.
DEFAULT_RETRIES = 20


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(fields: Sequence[Any], parts: Sequence[Any] | None = None) -> RequestRecord:
    """A record from its header fields and, if read, its parts (flat: name, text, ...)."""
    rid, key, status, version, plan_id, body, created, updated = (_text(f) for f in fields[:8])
    # Records written before to_run was kept have none: they count 0.
    to_run = int(fields[8] or 0) if len(fields) > 8 else 0
    found = None
    if parts is not None:
        texts = [_text(p) for p in parts]
        found = dict(zip(texts[::2], texts[1::2], strict=True))
    return RequestRecord(
        rid,
        key,
        status,
        int(version),
        plan_id,
        body,
        float(created),
        float(updated),
        to_run,
        found,
    )


def _record_args(record: RequestRecord) -> list[str]:
    """The header's fields, then its parts: count, name, text, ..."""
    parts = record.parts or {}
    return [
        record.id,
        record.key,
        record.status,
        str(record.version),
        record.plan_id,
        record.body,
        repr(record.created_at),
        repr(record.updated_at),
        str(record.to_run),
        str(len(parts)),
        *(x for item in parts.items() for x in item),
    ]


def _job_args(jobs: Sequence[JobRecord]) -> list[str]:
    out = [str(len(jobs))]
    for job in jobs:
        out += [
            job.id,
            job.request_id,
            job.task,
            str(job.attempt),
            job.service,
            job.payload,
            repr(job.available_at),
            repr(job.timeout),
        ]
    return out


def _job(fields: Sequence[Any]) -> JobRecord:
    jid, rid, task, attempt, service, payload, available_at, timeout = (
        _text(f) for f in fields[:8]
    )
    return JobRecord(
        jid, rid, task, int(attempt), service, payload, float(available_at), float(timeout)
    )


def _report_args(reports: Sequence[Report]) -> list[str]:
    out = [str(len(reports))]
    for r in reports:
        out += [
            r.job_id,
            "1" if r.ok else "0",
            json.dumps(
                [
                    r.job_id,
                    r.request_id,
                    r.task,
                    r.attempt,
                    r.ok,
                    r.payload,
                    r.worker,
                    r.at,
                    r.retryable,
                    r.elapsed,
                    r.info,
                ]
            ),
        ]
    return out


def _report(text: Any) -> Report:
    job_id, rid, task, attempt, ok, payload, worker, at, retryable, *rest = json.loads(text)
    # Reports written before durations were measured, or attempts recorded, lack those.
    elapsed = rest[0] if rest else 0.0
    info = rest[1] if len(rest) > 1 else ""
    return Report(job_id, rid, task, attempt, ok, payload, worker, at, retryable, elapsed, info)


def parse_url(url: str) -> tuple[str, str, int]:
    """Split Bach's own options off a Redis URL: (URL for redis-py, key prefix, retries)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", DEFAULT_PREFIX)
    if not prefix or any(c in prefix for c in " *?[]"):
        raise StoreError(
            "url", f"prefix {prefix!r} in {redact_url(url)!r} must be a plain, non-empty name"
        )
    retries = query.pop("retries", str(DEFAULT_RETRIES))
    if not retries.isdigit():
        raise StoreError(
            "url", f"retries {retries!r} in {redact_url(url)!r} must be a whole number"
        )
    return urlunsplit(parts._replace(query=urlencode(query))), prefix, int(retries)


class _Bells:
    """Wake-ups over pub/sub: one subscription per topic, kept for the backend's life, so a
    ring between two waits is not lost. ``subscribe`` returns once Redis has confirmed the
    subscription: whatever the caller reads after it, a later ring reaches it."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub: PubSub | None = None
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._confirmed: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._reader: asyncio.Task[None] | None = None
        #: Payloads of channels whose messages carry data, until taken.
        self._payloads: dict[str, list[str]] = defaultdict(list)
        # One subscriber at a time: two first subscriptions at once would each open a
        # connection, and the messages of the one left behind would never be read.
        self._lock = asyncio.Lock()

    async def subscribe(self, channel: str) -> None:
        confirmed = self._confirmed[channel]
        if confirmed.is_set():
            return
        async with self._lock:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            if channel not in self._pubsub.channels:
                await self._pubsub.subscribe(channel)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), 2.0)

    async def wait(self, channel: str, timeout: float) -> list[str]:
        """Wait for a ring; returns the payloads that came since the last wait."""
        await self.subscribe(channel)
        event = self._events[channel]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()
        return self._payloads.pop(channel, [])

    async def _read(self) -> None:
        assert self._pubsub is not None
        delay = 0.05
        while True:
            try:
                message = await self._pubsub.get_message(timeout=5.0)
                delay = 0.05
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis pub/sub lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                for event in self._events.values():  # rings may have been missed
                    event.set()
                continue
            if message is None:
                continue
            channel = _text(message["channel"])
            if message["type"] == "subscribe":
                self._confirmed[channel].set()
            else:
                if message["data"]:
                    self._payloads[channel].append(_text(message["data"]))
                self._events[channel].set()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


class RedisBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        client_url, self.prefix, retries = parse_url(url)
        self.keys = Keys(self.prefix)
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            client_url,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
            socket_connect_timeout=2.0,
            client_name=f"bach:{self.prefix}",
        )
        self._bells = _Bells(self._client)
        register = self._client.register_script
        self._create = register(_CREATE)
        self._commit = register(_COMMIT)
        self._lease = register(_LEASE)
        self._report = register(_REPORT)
        self._extend = register(_EXTEND)
        self._release = register(_RELEASE)
        self._release_worker = register(_RELEASE_WORKER)
        self._requeue_expired = register(_REQUEUE_EXPIRED)
        self._load = register(_LOAD)
        self._load_many = register(_LOAD_MANY)
        self._reports = register(_REPORTS)
        self._leased = register(_LEASED)
        self._stats = register(_STATS)
        self._purge = register(_PURGE)
        self._announce = register(_ANNOUNCE)

    async def _run(self, script: Any, *args: Any) -> Any:
        try:
            return await script(args=[self.prefix, *args])
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(
                "store", f"redis at {redact_url(self.url)} is unreachable: {exc}"
            ) from exc

    async def create(
        self, record: RequestRecord, plan_id: str, plan: str, jobs: Sequence[JobRecord]
    ) -> tuple[RequestRecord, bool]:
        reply = await self._run(
            self._create, *_record_args(record), plan_id, plan, *_job_args(jobs)
        )
        if reply[0] == 1:
            return record, True
        return _record(reply[1], reply[2]), False

    async def load(self, ref: str) -> RequestRecord | None:
        reply = await self._run(self._load, ref)
        return None if reply is None else _record(reply[0], reply[1])

    async def load_many(
        self, ids: Sequence[str], since: Mapping[str, int] | None = None
    ) -> dict[str, RequestRecord]:
        if not ids:
            return {}
        known = since or {}
        args = [x for rid in ids for x in (rid, str(known.get(rid, -1)))]
        rows = await self._run(self._load_many, *args)
        return {r.id: r for r in (_record(fields, parts) for fields, parts in rows)}

    async def _hmget_requests(self, ids: Sequence[str]) -> list[RequestRecord]:
        if not ids:
            return []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hmget(self.keys.req(rid), REQUEST_FIELDS)
                rows = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(
                "store", f"redis at {redact_url(self.url)} is unreachable: {exc}"
            ) from exc
        return [_record(row) for row in rows if row[0] is not None]

    async def list_requests(
        self, status: str | None = None, limit: int = 100, before: float | None = None
    ) -> list[RequestRecord]:
        index = self.keys.status(status) if status else self.keys.created
        high = "+inf" if before is None else f"({before!r}"
        ids = await self._client.zrevrangebyscore(index, high, "-inf", start=0, num=limit)
        return await self._hmget_requests([_text(i) for i in ids])

    async def plan(self, plan_id: str) -> str | None:
        found = await self._client.hget(self.keys.plans, plan_id)
        return None if found is None else _text(found)

    async def commit(self, transitions: Sequence[Transition]) -> list[bool]:
        if not transitions:
            return []
        args: list[str] = [str(len(transitions))]
        for t in transitions:
            args += [t.request_id, str(t.expected_version)]
            args += ["1", *_record_args(t.record)] if t.record is not None else ["0"]
            args += _job_args(t.enqueue)
            args += [str(len(t.consumed)), *t.consumed, "1" if t.withdraw else "0"]
        return [bool(r) for r in await self._run(self._commit, *args)]

    async def lease(
        self,
        service: str,
        worker: str,
        now: float,
        ttl: float,
        limit: int = 1,
        done: Sequence[Report] = (),
    ) -> list[Lease]:
        await self._bells.subscribe(self.keys.bell_jobs(service))
        until = now + ttl
        rows = await self._run(
            self._lease, service, worker, repr(now), repr(until), str(limit), *_report_args(done)
        )
        return [
            Lease(_job(row), worker, until, int(row[8]), tuple(json.loads(_text(row[9]))))
            for row in rows
        ]

    async def extend(self, job_ids: Sequence[str], worker: str, until: float) -> list[str]:
        if not job_ids:
            return []
        return [_text(i) for i in await self._run(self._extend, worker, repr(until), *job_ids)]

    async def leased(self, request_id: str) -> dict[str, str]:
        flat = [_text(x) for x in await self._run(self._leased, request_id)]
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def report(self, reports: Sequence[Report]) -> None:
        if reports:
            await self._run(self._report, *_report_args(reports))

    async def release(self, job_ids: Sequence[str], worker: str) -> int:
        if not job_ids:
            return 0
        return int(await self._run(self._release, worker, *job_ids))

    async def release_worker(self, worker: str) -> int:
        return int(await self._run(self._release_worker, worker, repr(time.time())))

    async def reports(self, limit: int) -> list[Report]:
        return (await self._read_reports(limit, False))[0]

    async def reports_with_requests(
        self, limit: int
    ) -> tuple[list[Report], dict[str, RequestRecord]]:
        return await self._read_reports(limit, True)

    async def _read_reports(
        self, limit: int, with_requests: bool
    ) -> tuple[list[Report], dict[str, RequestRecord]]:
        await self._bells.subscribe(self.keys.bell_reports)
        reports, *requests = await self._run(
            self._reports, str(limit), "1" if with_requests else "0"
        )
        records = (_record(fields) for fields in requests)
        return [_report(text) for text in reports if text], {r.id: r for r in records}

    async def requeue_expired(self, now: float) -> int:
        return int(await self._run(self._requeue_expired, repr(now)))

    async def purge(self, ended_before: float, limit: int = 1000) -> int:
        return int(await self._run(self._purge, repr(ended_before), str(limit)))

    async def announce(
        self, supervisor: str, instances: Mapping[str, int], until: float, now: float
    ) -> dict[str, dict[str, int]]:
        entry = json.dumps([until, dict(instances)])
        alive = await self._run(self._announce, supervisor, entry, repr(now))
        return {
            _text(alive[i]): {k: int(v) for k, v in json.loads(alive[i + 1])[1].items()}
            for i in range(0, len(alive), 2)
        }

    async def present(self, worker: str, info: str, until: float, now: float) -> None:
        key = self.keys.present
        try:
            if until <= now:
                await self._client.hdel(key, worker)
            else:
                await self._client.hset(key, worker, json.dumps([until, info]))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(
                "store", f"redis at {redact_url(self.url)} is unreachable: {exc}"
            ) from exc

    async def present_workers(self, now: float) -> dict[str, str]:
        key = self.keys.present
        found: dict[str, str] = {}
        gone: list[str] = []
        for name, entry in (await self._client.hgetall(key)).items():
            until, info = json.loads(entry)
            if until > now:
                found[_text(name)] = info
            else:
                gone.append(_text(name))
        if gone:
            await self._client.hdel(key, *gone)
        return found

    async def stats(self, now: float) -> Stats:
        requests, queues, workers, reports, to_run = await self._run(self._stats, repr(now))
        counts = {
            _text(requests[i]): int(requests[i + 1])
            for i in range(0, len(requests), 2)
            if int(requests[i + 1])
        }
        per_service: dict[str, QueueStats] = {}
        for service, queued, delayed, running, oldest, tallies in queues:
            queued, delayed, running = int(queued), int(delayed), int(running)
            first = float(oldest) if oldest and queued else None
            enqueued, completed, failed = (int(t or 0) for t in tallies)
            per_service[_text(service)] = QueueStats(
                queued, delayed, running, first, enqueued, completed, failed
            )
        holders = {_text(workers[i]): int(workers[i + 1]) for i in range(0, len(workers), 2)}
        return Stats(counts, per_service, int(reports), holders, int(to_run))

    async def wait_jobs(self, service: str, timeout: float) -> None:
        await self._bells.wait(self.keys.bell_jobs(service), timeout)

    async def wait_reports(self, timeout: float) -> None:
        await self._bells.wait(self.keys.bell_reports, timeout)

    async def wait_ended(self, timeout: float) -> list[str]:
        return await self._bells.wait(self.keys.bell_ended, timeout)

    async def close(self) -> None:
        await self._bells.close()
        await self._client.aclose()

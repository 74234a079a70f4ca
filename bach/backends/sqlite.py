"""The embedded default: one SQLite file in WAL mode, shared by every process on a host.

Durability. Creating a request and committing a transition are durable when they
return: the commit fsyncs the WAL (``synchronous=FULL``), so they survive a pulled plug,
not only a crashed process. Under load many operations share one commit (group
commit): one writer thread per process takes every waiting operation, runs each in its
own savepoint inside one transaction, and fsyncs once. Leases and workers' reports are
committed without their own fsync: a machine that loses power before the next durable
commit forgets them, and the job simply runs again (delivery is at-least-once); a
crashed process loses nothing, since SQLite's WAL is in the OS cache. The URL option
``?synchronous=normal`` drops the fsync everywhere, trading power-loss safety for speed.

Reads go through their own connection and never wait for writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from bach.backends import sqlite_path
from bach.backends._bell import Bell, bell_folder
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

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    version INTEGER NOT NULL, plan_id TEXT NOT NULL, body TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, to_run INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS requests_by_status ON requests(status, created_at);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests(created_at);
CREATE TABLE IF NOT EXISTS request_parts (
    request_id TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    body TEXT NOT NULL, UNIQUE (request_id, name));
CREATE INDEX IF NOT EXISTS parts_by_version ON request_parts(request_id, version);
CREATE TRIGGER IF NOT EXISTS parts_delete AFTER DELETE ON requests BEGIN
    DELETE FROM request_parts WHERE request_id = OLD.id; END;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL, task TEXT NOT NULL,
    attempt INTEGER NOT NULL, service TEXT NOT NULL, payload TEXT NOT NULL,
    available_at REAL NOT NULL, timeout REAL NOT NULL,
    worker TEXT, lease_until REAL, deliveries INTEGER NOT NULL DEFAULT 0,
    lost TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(service, available_at) WHERE worker IS NULL;
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs(lease_until) WHERE worker IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_request ON jobs(request_id);
CREATE TABLE IF NOT EXISTS reports (
    job_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, task TEXT NOT NULL,
    attempt INTEGER NOT NULL, ok INTEGER NOT NULL, payload TEXT NOT NULL,
    retryable INTEGER NOT NULL, worker TEXT NOT NULL, at REAL NOT NULL,
    elapsed REAL NOT NULL DEFAULT 0, info TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS supervisors (
    id TEXT PRIMARY KEY, until REAL NOT NULL, instances TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers_present (
    id TEXT PRIMARY KEY, until REAL NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS service_counts (
    service TEXT PRIMARY KEY, enqueued INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0);
"""

#: The sum of ``requests.to_run``, kept by triggers in the same transactions.
TOTALS = """
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO totals (name, value)
    SELECT 'to_run', coalesce(sum(to_run), 0) FROM requests;
CREATE TRIGGER IF NOT EXISTS to_run_insert AFTER INSERT ON requests BEGIN
    UPDATE totals SET value = value + NEW.to_run WHERE name = 'to_run'; END;
CREATE TRIGGER IF NOT EXISTS to_run_update AFTER UPDATE OF to_run ON requests BEGIN
    UPDATE totals SET value = value + NEW.to_run - OLD.to_run WHERE name = 'to_run'; END;
CREATE TRIGGER IF NOT EXISTS to_run_delete AFTER DELETE ON requests BEGIN
    UPDATE totals SET value = value - OLD.to_run WHERE name = 'to_run'; END;
"""

_REQUEST_COLS = "id, key, status, version, plan_id, body, created_at, updated_at, to_run"
_JOB_COLS = "id, request_id, task, attempt, service, payload, available_at, timeout"
_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "off": "OFF", "extra": "EXTRA"}
#: Most operations one group commit takes.
_BATCH = 512


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store made by an earlier version up to this schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(reports)")}
    if "elapsed" not in columns:  # before job durations were reported
        conn.execute("ALTER TABLE reports ADD COLUMN elapsed REAL NOT NULL DEFAULT 0")
    if "info" not in columns:  # before attempts were on record
        conn.execute("ALTER TABLE reports ADD COLUMN info TEXT NOT NULL DEFAULT ''")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "lost" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN lost TEXT NOT NULL DEFAULT '[]'")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if "to_run" not in columns:  # counted from each request's next step on
        conn.execute("ALTER TABLE requests ADD COLUMN to_run INTEGER NOT NULL DEFAULT 0")
    conn.executescript(TOTALS)


def _request(row: Sequence[Any]) -> RequestRecord:
    return RequestRecord(*row)


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(*row)


def _report_row(row: Sequence[Any]) -> Report:
    job_id, request_id, task, attempt, ok, payload, retryable, worker, at, elapsed, info = row
    return Report(
        job_id,
        request_id,
        task,
        attempt,
        bool(ok),
        payload,
        worker,
        at,
        bool(retryable),
        elapsed,
        info,
    )


class _Op:
    __slots__ = ("durable", "fn", "future", "loop", "topics")

    def __init__(self, fn: Callable[[sqlite3.Connection, set[str]], Any], durable: bool) -> None:
        self.fn = fn
        self.durable = durable
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class SqliteBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_path(url)
        options = parse_qs(urlsplit(url).query)
        mode = options.get("synchronous", ["full"])[-1].lower()
        if mode not in _SYNC_MODES:
            raise StoreError("url", f"synchronous={mode!r} is not one of {', '.join(_SYNC_MODES)}")
        self.synchronous = _SYNC_MODES[mode]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(self._connect()) as conn:
                conn.executescript(SCHEMA)
                _migrate(conn)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError("store", f"cannot open {self.path}: {exc}") from None
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_loop, name="bach-sqlite-writer", daemon=True
        )
        self._writer.start()
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="bach-sqlite-reader")
        self._reader_conns: list[sqlite3.Connection] = []
        self._bell = Bell(bell_folder(str(self.path.resolve())))
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    # -- threads -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = self._connect()
        # SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, which several
        # processes writing small transactions turn into long stalls. The writer waits
        # for the lock itself, in steps of tens of microseconds (see _begin).
        conn.execute("PRAGMA busy_timeout=0")
        mode = self.synchronous
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        op = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        self._ops.put(None)
                        break
                    batch.append(op)
                wanted = self.synchronous
                if self.synchronous == "FULL" and not any(op.durable for op in batch):
                    wanted = "NORMAL"
                if wanted != mode:
                    conn.execute(f"PRAGMA synchronous={wanted}")
                    mode = wanted
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        topics: set[str] = set()
        try:
            _begin(conn)
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op.fn(conn, topics)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StoreError("store", f"{self.path}: {exc}")
            outcomes = [(False, error)] * len(batch)
            topics = set()
        for topic in topics:
            self._bell.ring(topic)
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            op.loop.call_soon_threadsafe(_settle, op.future, ok, value)

    def _submit(
        self, fn: Callable[[sqlite3.Connection, set[str]], Any], durable: bool
    ) -> asyncio.Future[Any]:
        if self._closed:
            raise StoreError("store", "the store is closed")
        op = _Op(fn, durable)
        self._ops.put(op)
        return op.future

    async def _write(self, fn: Callable[[sqlite3.Connection, set[str]], T], durable: bool) -> T:
        result: T = await self._submit(fn, durable)
        return result

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(self._reader()))

    # -- requests ------------------------------------------------------------------------

    async def create(
        self, record: RequestRecord, plan_id: str, plan: str, jobs: Sequence[JobRecord]
    ) -> tuple[RequestRecord, bool]:
        def op(conn: sqlite3.Connection, topics: set[str]) -> tuple[RequestRecord, bool]:
            row = conn.execute(
                f"SELECT {_REQUEST_COLS} FROM requests WHERE key = ?", (record.key,)
            ).fetchone()
            if row is not None:
                return _with_parts(conn, _request(row)), False
            conn.execute("INSERT OR IGNORE INTO plans (id, body) VALUES (?, ?)", (plan_id, plan))
            conn.execute(
                f"INSERT INTO requests ({_REQUEST_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.key,
                    record.status,
                    record.version,
                    record.plan_id,
                    record.body,
                    record.created_at,
                    record.updated_at,
                    record.to_run,
                ),
            )
            _write_parts(conn, record)
            _enqueue(conn, jobs, topics)
            return record, True

        return await self._write(op, durable=True)

    async def load(self, ref: str) -> RequestRecord | None:
        def op(conn: sqlite3.Connection) -> RequestRecord | None:
            row = (
                conn.execute(
                    f"SELECT {_REQUEST_COLS} FROM requests WHERE id = ?", (ref,)
                ).fetchone()
                or conn.execute(
                    f"SELECT {_REQUEST_COLS} FROM requests WHERE key = ?", (ref,)
                ).fetchone()
            )
            return None if row is None else _with_parts(conn, _request(row))

        return await self._read(_snapshot(op))

    async def load_many(
        self, ids: Sequence[str], since: Mapping[str, int] | None = None
    ) -> dict[str, RequestRecord]:
        known = since or {}

        def op(conn: sqlite3.Connection) -> dict[str, RequestRecord]:
            return {
                rid: _with_parts(conn, record, known.get(rid, -1))
                for rid, record in _load_many(conn, ids).items()
            }

        return await self._read(_snapshot(op))

    async def list_requests(
        self, status: str | None = None, limit: int = 100, before: float | None = None
    ) -> list[RequestRecord]:
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if before is not None:
            where.append("created_at < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_REQUEST_COLS} FROM requests {clause} ORDER BY created_at DESC LIMIT ?"

        def op(conn: sqlite3.Connection) -> list[RequestRecord]:
            return [_request(row) for row in conn.execute(sql, (*args, limit))]

        return await self._read(op)

    async def plan(self, plan_id: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT body FROM plans WHERE id = ?", (plan_id,)).fetchone()
            return None if row is None else str(row[0])

        return await self._read(op)

    async def commit(self, transitions: Sequence[Transition]) -> list[bool]:
        def apply(t: Transition) -> Callable[[sqlite3.Connection, set[str]], bool]:
            def op(conn: sqlite3.Connection, topics: set[str]) -> bool:
                if t.record is not None:
                    r = t.record
                    cur = conn.execute(
                        "UPDATE requests SET status = ?, version = ?, body = ?, updated_at = ?,"
                        " to_run = ? WHERE id = ? AND version = ?",
                        (
                            r.status,
                            r.version,
                            r.body,
                            r.updated_at,
                            r.to_run,
                            t.request_id,
                            t.expected_version,
                        ),
                    )
                    if cur.rowcount != 1:
                        return False
                    _write_parts(conn, r)
                if t.consumed:
                    conn.executemany(
                        "DELETE FROM reports WHERE job_id = ?", [(i,) for i in t.consumed]
                    )
                if t.withdraw:
                    conn.execute("DELETE FROM jobs WHERE request_id = ?", (t.request_id,))
                _enqueue(conn, t.enqueue, topics)
                return True

            return op

        # Queued together, so that one commit (one fsync) takes them all.
        futures = [self._submit(apply(t), True) for t in transitions]
        return list(await asyncio.gather(*futures))

    # -- queues --------------------------------------------------------------------------

    async def lease(
        self,
        service: str,
        worker: str,
        now: float,
        ttl: float,
        limit: int = 1,
        done: Sequence[Report] = (),
    ) -> list[Lease]:
        self._bell.listen("jobs:" + service)  # from now on no ring is missed

        def op(conn: sqlite3.Connection, topics: set[str]) -> list[Lease]:
            _report(conn, done, topics)
            rows = conn.execute(
                "UPDATE jobs SET worker = ?, lease_until = ?, deliveries = deliveries + 1"
                " WHERE id IN (SELECT id FROM jobs WHERE worker IS NULL AND service = ?"
                " AND available_at <= ? ORDER BY available_at LIMIT ?)"
                f" RETURNING {_JOB_COLS}, deliveries, lost",
                (worker, now + ttl, service, now, limit),
            ).fetchall()
            rows.sort(key=lambda row: row[6])
            return [
                Lease(_job(row[:8]), worker, now + ttl, row[8], tuple(json.loads(row[9])))
                for row in rows
            ]

        return await self._write(op, durable=False)

    async def extend(self, job_ids: Sequence[str], worker: str, until: float) -> list[str]:
        def op(conn: sqlite3.Connection, topics: set[str]) -> list[str]:
            lost = []
            for job_id in job_ids:
                cur = conn.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker = ?",
                    (until, job_id, worker),
                )
                if cur.rowcount != 1:
                    lost.append(job_id)
            return lost

        return await self._write(op, durable=False)

    async def leased(self, request_id: str) -> dict[str, str]:
        def op(conn: sqlite3.Connection) -> dict[str, str]:
            return dict(
                conn.execute(
                    "SELECT task, worker FROM jobs WHERE request_id = ? AND worker IS NOT NULL",
                    (request_id,),
                )
            )

        return await self._read(op)

    async def report(self, reports: Sequence[Report]) -> None:
        if reports:
            await self._write(lambda conn, topics: _report(conn, reports, topics), durable=False)

    async def release(self, job_ids: Sequence[str], worker: str) -> int:
        def op(conn: sqlite3.Connection, topics: set[str]) -> int:
            released = 0
            for job_id in job_ids:
                row = conn.execute(
                    "UPDATE jobs SET worker = NULL, lease_until = NULL,"
                    " deliveries = deliveries - 1 WHERE id = ? AND worker = ? RETURNING service",
                    (job_id, worker),
                ).fetchone()
                if row is not None:
                    released += 1
                    topics.add("jobs:" + row[0])
            return released

        return await self._write(op, durable=False)

    async def release_worker(self, worker: str) -> int:
        return await self._requeue("worker = ?", (worker,), "worker died", time.time())

    async def requeue_expired(self, now: float) -> int:
        return await self._requeue(
            "worker IS NOT NULL AND lease_until < ?", (now,), "lease expired", now
        )

    async def _requeue(self, where: str, args: tuple[Any, ...], reason: str, now: float) -> int:
        def op(conn: sqlite3.Connection, topics: set[str]) -> int:
            rows = conn.execute(
                "UPDATE jobs SET worker = NULL, lease_until = NULL, lost = json_insert(lost,"
                " '$[#]', json_object('worker', worker, 'reason', ?, 'at', ?))"
                f" WHERE {where} RETURNING service",
                (reason, now, *args),
            ).fetchall()
            topics.update("jobs:" + row[0] for row in rows)
            return len(rows)

        return await self._write(op, durable=False)

    async def purge(self, ended_before: float, limit: int = 1000) -> int:
        def op(conn: sqlite3.Connection, topics: set[str]) -> int:
            return conn.execute(
                "DELETE FROM requests WHERE id IN (SELECT id FROM requests"
                " WHERE status IN ('COMPLETE', 'FAILED', 'CANCELLED') AND updated_at < ?"
                " LIMIT ?)",
                (ended_before, limit),
            ).rowcount

        return await self._write(op, durable=True)

    async def reports(self, limit: int) -> list[Report]:
        return await self._read(lambda conn: _reports(conn, limit))

    async def reports_with_requests(
        self, limit: int
    ) -> tuple[list[Report], dict[str, RequestRecord]]:
        def op(conn: sqlite3.Connection) -> tuple[list[Report], dict[str, RequestRecord]]:
            reports = _reports(conn, limit)
            return reports, _load_many(conn, list({r.request_id for r in reports}))

        return await self._read(op)

    async def announce(
        self, supervisor: str, instances: Mapping[str, int], until: float, now: float
    ) -> dict[str, dict[str, int]]:
        def op(conn: sqlite3.Connection, topics: set[str]) -> dict[str, dict[str, int]]:
            conn.execute(
                "INSERT INTO supervisors (id, until, instances) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET until = excluded.until,"
                " instances = excluded.instances",
                (supervisor, until, json.dumps(dict(instances))),
            )
            conn.execute("DELETE FROM supervisors WHERE until <= ?", (now,))
            rows = conn.execute("SELECT id, instances FROM supervisors").fetchall()
            return {name: json.loads(counts) for name, counts in rows}

        # Presence, not data: losing the last few in a power cut costs nothing.
        return await self._write(op, durable=False)

    async def present(self, worker: str, info: str, until: float, now: float) -> None:
        def op(conn: sqlite3.Connection, topics: set[str]) -> None:
            conn.execute(
                "INSERT INTO workers_present (id, until, info) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET until = excluded.until, info = excluded.info",
                (worker, until, info),
            )
            conn.execute("DELETE FROM workers_present WHERE until <= ?", (now,))

        await self._write(op, durable=False)  # presence, not data

    async def present_workers(self, now: float) -> dict[str, str]:
        def op(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute("SELECT id, info FROM workers_present WHERE until > ?", (now,))
            return dict(rows)

        return await self._read(op)

    async def stats(self, now: float) -> Stats:
        def op(conn: sqlite3.Connection) -> Stats:
            counts = dict(conn.execute("SELECT status, count(*) FROM requests GROUP BY status"))
            queues: dict[str, QueueStats] = {}
            for service, queued, delayed, running, oldest in conn.execute(
                "SELECT service,"
                " sum(worker IS NULL AND available_at <= :now),"
                " sum(worker IS NULL AND available_at > :now),"
                " sum(worker IS NOT NULL),"
                " min(CASE WHEN worker IS NULL AND available_at <= :now THEN available_at END)"
                " FROM jobs GROUP BY service",
                {"now": now},
            ):
                queues[service] = QueueStats(queued, delayed, running, oldest)
            for service, enqueued, completed, failed in conn.execute(
                "SELECT service, enqueued, completed, failed FROM service_counts"
            ):
                queues[service] = replace(
                    queues.get(service, QueueStats()),
                    enqueued=enqueued,
                    completed=completed,
                    failed=failed,
                )
            workers = dict(
                conn.execute(
                    "SELECT worker, count(*) FROM jobs WHERE worker IS NOT NULL GROUP BY worker"
                )
            )
            reports = conn.execute("SELECT count(*) FROM reports").fetchone()[0]
            (to_run,) = conn.execute("SELECT value FROM totals WHERE name = 'to_run'").fetchone()
            return Stats(counts, queues, reports, workers, to_run)

        return await self._read(op)

    async def wait_jobs(self, service: str, timeout: float) -> None:
        await self._bell.wait("jobs:" + service, timeout)

    async def wait_reports(self, timeout: float) -> None:
        await self._bell.wait("reports", timeout)

    async def wait_ended(self, timeout: float) -> list[str]:
        # One engine per file, in practice: it wakes its own waiters as it ends requests.
        await asyncio.sleep(timeout)
        return []

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            conn.close()
        self._bell.close()


def _add_counts(conn: sqlite3.Connection, service: str, **counts: int) -> None:
    columns = ", ".join(counts)
    marks = ", ".join("?" for _ in counts)
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in counts)
    conn.execute(
        f"INSERT INTO service_counts (service, {columns}) VALUES (?, {marks})"
        f" ON CONFLICT (service) DO UPDATE SET {updates}",
        (service, *counts.values()),
    )


def _report(conn: sqlite3.Connection, reports: Sequence[Report], topics: set[str]) -> None:
    """Ack the jobs and put their outcomes on the completion channel."""
    if not reports:
        return
    # Outcomes count once per job: a duplicate report finds its job already gone.
    ok = {r.job_id: r.ok for r in reports}
    outcomes: Counter[tuple[str, bool]] = Counter()
    for start in range(0, len(reports), _BATCH):
        ids = [r.job_id for r in reports[start : start + _BATCH]]
        marks = ", ".join("?" for _ in ids)
        for job_id, service in conn.execute(
            f"SELECT id, service FROM jobs WHERE id IN ({marks})", ids
        ):
            outcomes[service, ok[job_id]] += 1
    for (service, good), count in outcomes.items():
        _add_counts(conn, service, **{"completed" if good else "failed": count})
    conn.executemany("DELETE FROM jobs WHERE id = ?", [(r.job_id,) for r in reports])
    conn.executemany(
        "INSERT OR IGNORE INTO reports (job_id, request_id, task, attempt, ok, payload,"
        " retryable, worker, at, elapsed, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                r.job_id,
                r.request_id,
                r.task,
                r.attempt,
                int(r.ok),
                r.payload,
                int(r.retryable),
                r.worker,
                r.at,
                r.elapsed,
                r.info,
            )
            for r in reports
        ],
    )
    topics.add("reports")


def _begin(conn: sqlite3.Connection, patience: float = 60.0) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write to finish."""
    delay = 20e-6
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 1.5, 1e-3)


def _enqueue(conn: sqlite3.Connection, jobs: Sequence[JobRecord], topics: set[str]) -> None:
    by_service: dict[str, list[JobRecord]] = {}
    for job in jobs:
        by_service.setdefault(job.service, []).append(job)
    for service, group in by_service.items():
        added = conn.executemany(
            f"INSERT OR IGNORE INTO jobs ({_JOB_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (j.id, j.request_id, j.task, j.attempt, j.service, j.payload, j.available_at,
                 j.timeout)
                for j in group
            ],
        ).rowcount  # fmt: skip
        if added > 0:
            _add_counts(conn, service, enqueued=added)
        topics.add("jobs:" + service)


def _snapshot(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """``fn`` in one read transaction: its queries see one version of the store."""

    def op(conn: sqlite3.Connection) -> T:
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    return op


def _write_parts(conn: sqlite3.Connection, record: RequestRecord) -> None:
    if record.parts:
        conn.executemany(
            "INSERT INTO request_parts (request_id, name, version, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (request_id, name) DO UPDATE SET version = excluded.version,"
            " body = excluded.body",
            [(record.id, name, record.version, text) for name, text in record.parts.items()],
        )


def _with_parts(conn: sqlite3.Connection, record: RequestRecord, since: int = -1) -> RequestRecord:
    """The record with its parts written after version ``since``."""
    rows = conn.execute(
        "SELECT name, body FROM request_parts WHERE request_id = ? AND version > ?",
        (record.id, since),
    )
    return replace(record, parts=dict(rows))


def _load_many(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, RequestRecord]:
    found: dict[str, RequestRecord] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT {_REQUEST_COLS} FROM requests WHERE id IN ({marks})", chunk
        ):
            found[row[0]] = _request(row)
    return found


def _reports(conn: sqlite3.Connection, limit: int) -> list[Report]:
    rows = conn.execute(
        "SELECT job_id, request_id, task, attempt, ok, payload, retryable, worker, at,"
        " elapsed, info FROM reports ORDER BY rowid LIMIT ?",
        (limit,),
    ).fetchall()
    return [_report_row(row) for row in rows]

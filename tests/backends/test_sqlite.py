"""What only the SQLite backend promises: several processes on one file, durability."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bach.backends import open_backend, sqlite_path
from bach.backends.port import JobRecord, Report, RequestRecord, Transition
from bach.backends.sqlite import SqliteBackend
from bach.errors import StoreError

NOW = 1_000_000.0

LEASER = """
import asyncio, json, sys
from bach.backends import open_backend

async def main(url, worker):
    store = open_backend(url)
    taken = []
    while True:
        leases = await store.lease("A", worker, 2_000_000.0, 60, limit=3)
        if not leases:
            break
        taken += [lease.job.id for lease in leases]
    await store.close()
    print(json.dumps(taken))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_processes_sharing_one_file_never_lease_the_same_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    store = open_backend(url)
    jobs = [JobRecord(f"r/t{i}/1", "r", f"t{i}", 1, "A", "null", NOW + i, 30) for i in range(600)]
    await store.create(RequestRecord("r", "r", "PENDING", 0, "p", "{}", NOW, NOW), "p", "{}", jobs)
    procs = [
        subprocess.Popen([sys.executable, "-c", LEASER, url, f"w{i}"], stdout=subprocess.PIPE)
        for i in range(3)
    ]
    taken: list[str] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            taken += json.loads(out)
    finally:
        for proc in procs:
            proc.kill()
        await store.close()
    assert sorted(taken) == sorted(j.id for j in jobs)
    assert len(set(taken)) == len(taken)


async def test_everything_committed_is_there_after_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bach.db"
    store = open_backend(url)
    rec = RequestRecord("r1", "k1", "PENDING", 0, "p", '{"a": 1}', NOW, NOW, parts={"input": "2"})
    job = JobRecord("r1/a/1", "r1", "a", 1, "A", "5", NOW, 30)
    await store.create(rec, "p", '{"plan": 1}', [job])
    await store.close()
    again = open_backend(url)
    try:
        assert await again.load("k1") == rec
        assert await again.plan("p") == '{"plan": 1}'
        [lease] = await again.lease("A", "w", NOW, 10)
        assert lease.job == job
    finally:
        await again.close()


def test_url_forms_and_options(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:///.bach/bach.db") == Path(".bach/bach.db")
    assert sqlite_path("sqlite:////var/lib/bach.db") == Path("/var/lib/bach.db")
    with pytest.raises(StoreError, match="synchronous='fast'"):
        SqliteBackend(f"sqlite:///{tmp_path}/x.db?synchronous=fast")
    with pytest.raises(StoreError, match="names no file"):
        sqlite_path("sqlite://")


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="unknown store scheme 'postgres'"):
        open_backend("postgres://localhost/bach")


async def test_default_is_durable_and_normal_is_an_option(tmp_path: Path) -> None:
    durable = SqliteBackend(f"sqlite:///{tmp_path}/a.db")
    fast = SqliteBackend(f"sqlite:///{tmp_path}/b.db?synchronous=normal")
    try:
        assert durable.synchronous == "FULL" and fast.synchronous == "NORMAL"
    finally:
        await durable.close()
        await fast.close()


def test_a_store_that_cannot_be_created_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        SqliteBackend(f"sqlite:///{blocker}/sub/bach.db")


async def test_a_store_from_before_job_durations_opens_and_keeps_its_reports(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the reports table as it was before `elapsed`
        conn.execute(
            "CREATE TABLE reports (job_id TEXT PRIMARY KEY, request_id TEXT NOT NULL,"
            " task TEXT NOT NULL, attempt INTEGER NOT NULL, ok INTEGER NOT NULL,"
            " payload TEXT NOT NULL, retryable INTEGER NOT NULL, worker TEXT NOT NULL,"
            " at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO reports VALUES ('r1/a/1', 'r1', 'a', 1, 1, '7', 1, 'w1', 5.0)")
        conn.execute(  # and requests before they kept the count of tasks still to run
            "CREATE TABLE requests (id TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE,"
            " status TEXT NOT NULL, version INTEGER NOT NULL, plan_id TEXT NOT NULL,"
            " body TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO requests VALUES ('r1', 'r1', 'RUNNING', 1, 'p', '{}', 5, 5)")
    store = SqliteBackend(f"sqlite:///{path}")
    try:
        (old,) = await store.reports(10)
        assert (old.job_id, old.payload, old.elapsed) == ("r1/a/1", "7", 0.0)
        new = Report("r2/a/1", "r2", "a", 1, True, "8", "w1", 6.0, True, 0.5)
        await store.report([new])
        assert await store.reports(10) == [old, new]
        # The old request counts 0 until its next step says how many tasks it has left.
        assert (await store.stats(NOW)).to_run == 0
        step = RequestRecord("r1", "r1", "RUNNING", 2, "p", "{}", 5, 6, to_run=2)
        assert await store.commit([Transition("r1", 1, step)]) == [True]
        assert (await store.stats(NOW)).to_run == 2
    finally:
        await store.close()


async def test_purge_deletes_the_parts_of_the_requests_it_forgets(tmp_path: Path) -> None:
    store = open_backend(f"sqlite:///{tmp_path}/bach.db")
    try:
        rec = RequestRecord("r1", "k1", "COMPLETE", 0, "p", "{}", NOW, NOW, parts={"input": "1"})
        await store.create(rec, "p", "{}", [])
        assert await store.purge(NOW + 1) == 1
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "bach.db") as conn:
        assert conn.execute("SELECT count(*) FROM request_parts").fetchone() == (0,)

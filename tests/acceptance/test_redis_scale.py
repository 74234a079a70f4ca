"""Scale-out on one Redis: two engines with their APIs, four worker processes elsewhere."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import redis_store
from tests.helpers import FIXTURES, Workers, read_log, running_system

pytestmark = pytest.mark.slow

REQUESTS = 1000
SCORE = FIXTURES / "svc.yaml"


def expected(i: int) -> str:
    a = f"a({i})"
    return f"e({[f'b({a})', f'c({a})', f'd({a})']})"


def submit_all(urls: list[str]) -> list[str]:
    """Submit through every API in turn, from several client threads."""
    clients = [httpx.Client(base_url=url, timeout=30) for url in urls]

    def send(i: int) -> str:
        answer = clients[i % len(urls)].post("/api/requests", json={"rubric": "fan", "input": i})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(send, range(REQUESTS)))
    finally:
        for client in clients:
            client.close()


def test_two_engines_and_four_workers_apply_every_result_once(
    tmp_path: Path, redis_prefix: str
) -> None:
    store = redis_store(redis_prefix)
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    workers = Workers(store, tmp_path, env, [SCORE])
    with (
        running_system([SCORE], store, tmp_path, "--no-workers", env=env) as one,
        running_system([SCORE], store, tmp_path, "--no-workers", env=env) as two,
    ):
        try:
            for service in ("P", "Q", "R", "S"):
                workers.start(service)
            started = time.monotonic()
            ids = submit_all([one.url, two.url])
            print(f"submitted in {time.monotonic() - started:.1f}s")
            readers = [httpx.Client(base_url=url, timeout=90) for url in (two.url, one.url)]
            # Read each request back through the API it was not submitted to.
            finished = [
                readers[n % 2].get(f"/api/requests/{rid}", params={"wait": 60}).json()
                for n, rid in enumerate(ids)
            ]
            elapsed = time.monotonic() - started
            applied = [r.get("/api/stats").json()["engine"]["applied_reports"] for r in readers]
            for reader in readers:
                reader.close()
        finally:
            workers.stop_all()

    for i, request in enumerate(finished):
        assert request["status"] == "COMPLETE", request
        assert request["result"] == expected(i)
        assert {
            name: (job["status"], job["attempts"]) for name, job in request["jobs"].items()
        } == {name: ("COMPLETE", 1) for name in "abcde"}
    calls = Counter((c["task"], str(c["value"])) for c in read_log(log))
    assert len(calls) == REQUESTS * 5
    assert set(calls.values()) == {1}, [job for job, n in calls.items() if n > 1][:5]
    # Both engines applied results, and between them each result exactly once.
    assert all(applied) and sum(applied) == REQUESTS * 5, applied
    # Four worker processes served the four services.
    assert len({c["pid"] for c in read_log(log)}) == 4
    print(f"{REQUESTS} fan requests, {REQUESTS * 5} steps in {elapsed:.1f}s")

"""Pull the plug on a busy system, start it again: nothing lost, nothing applied twice."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers import FIXTURES, pull_plug, read_log, running_system, start_system, stop

pytestmark = pytest.mark.slow

REQUESTS = 30
TASKS = ("s1", "s2", "s3")


def test_kill_9_then_restart_finishes_every_request_once(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"BACH_TEST_LOG": str(log)}
    store = f"sqlite:///{tmp_path}/bach.db"
    first = start_system([FIXTURES / "svc.yaml"], store, tmp_path, env=env)
    try:
        ids = [
            httpx.post(f"{first.url}/api/requests", json={"rubric": "slow3", "input": i}).json()[
                "id"
            ]
            for i in range(REQUESTS)
        ]
        deadline = time.monotonic() + 30
        while len(read_log(log)) < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        pull_plug(first)  # mid-flight, workers included
    finally:
        stop(first.process)
    before = len(read_log(log))
    assert 0 < before < REQUESTS * len(TASKS), "the kill should land mid-flight"

    with running_system([FIXTURES / "svc.yaml"], store, tmp_path, env=env) as second:
        finished = [
            httpx.get(f"{second.url}/api/requests/{rid}", params={"wait": 60}, timeout=90).json()
            for rid in ids
        ]

    for i, request in enumerate(finished):
        assert request["status"] == "COMPLETE", request
        assert request["result"] == f"s3(s2(s1({i})))"
        assert [(name, job["status"]) for name, job in request["jobs"].items()] == [
            (t, "COMPLETE") for t in TASKS
        ]
        for job in request["jobs"].values():
            # A job in a worker's hands at the kill counts that lost attempt.
            outcomes = [a["outcome"] for a in job["history"]]
            assert outcomes in (["ok"], ["lost", "ok"]), job
            assert job["attempts"] == len(outcomes)
    lost = sum(
        1 for r in finished for j in r["jobs"].values() if j["history"][0]["outcome"] == "lost"
    )
    assert lost <= len(TASKS) * 16  # at most what the three workers held (prefetch)
    calls = Counter((c["task"], str(c["value"])) for c in read_log(log))
    assert len(calls) == REQUESTS * len(TASKS)  # every job ran
    repeated = {job: n for job, n in calls.items() if n > 1}
    # Only a job that was in a worker's hands when the plug was pulled may run again,
    # once: one service worker process each for s1, s2 and s3.
    assert all(n == 2 for n in repeated.values()), repeated
    assert len(repeated) <= len(TASKS), repeated

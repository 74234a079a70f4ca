"""The supervisor scales real worker processes with the load (loose bounds: 2 cores)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import FIXTURES, running_system

pytestmark = pytest.mark.slow

SCORE = FIXTURES / "scaling.yaml"


def instances(http: httpx.Client, service: str) -> int:
    return int(http.get("/api/stats").json()["services"][service]["instances"])


def test_a_burst_scales_up_to_max_then_back_to_min(tmp_path: Path) -> None:
    with running_system([SCORE], f"sqlite:///{tmp_path}/bach.db", tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        assert instances(http, "burst") == 1
        started = time.monotonic()

        def send(i: int) -> str:
            body = {"todo": ["burst"], "input": {"task": "t", "value": i, "sleep": 0.02}}
            return str(http.post("/api/requests", json=body).json()["id"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(send, range(200)))
        peak, peak_at = 0, None
        while time.monotonic() - started < 30:
            count = instances(http, "burst")
            if count > peak:
                peak, peak_at = count, time.monotonic() - started
            stats = http.get("/api/stats").json()
            if stats["active_requests"] == 0:
                break
            time.sleep(0.1)
        for rid in ids:
            assert http.get(f"/api/requests/{rid}").json()["status"] == "COMPLETE"
        assert peak == 4 and peak_at is not None and peak_at < 2.5, (peak, peak_at)
        deadline = time.monotonic() + 15
        while instances(http, "burst") > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert instances(http, "burst") == 1  # back to min_instances after idle_timeout
        events = http.get("/api/events/scaling").json()["events"]
        burst = [(e["from"], e["to"]) for e in events if e["service"] == "burst"]
        assert burst[0][0] == 1 and burst[0][1] > 1 and burst[-1][1] == 1, burst
        assert all(e["reason"] for e in events)
        http.close()


def test_a_service_that_is_off_cold_starts_for_a_request(tmp_path: Path) -> None:
    with running_system([SCORE], f"sqlite:///{tmp_path}/bach.db", tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        assert instances(http, "sleeper") == 0
        body = {"todo": ["sleeper"], "input": {"task": "t", "value": 1}}
        done = http.post("/api/requests", params={"wait": 20}, json=body).json()
        assert done["status"] == "COMPLETE" and done["result"] == "t(1)"
        events = http.get("/api/events/scaling").json()["events"]
        assert any(e["service"] == "sleeper" and e["from"] == 0 for e in events), events
        http.close()

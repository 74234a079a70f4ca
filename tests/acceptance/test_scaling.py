"""The supervisor scales real worker processes with the load (loose bounds: 2 cores),
on SQLite and on Redis."""

from __future__ import annotations

import concurrent.futures
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import FIXTURES, bach, running_system

pytestmark = pytest.mark.slow

SCORE = FIXTURES / "scaling.yaml"


def instances(http: httpx.Client, service: str) -> int:
    return int(http.get("/api/stats").json()["services"][service]["instances"])


def states(http: httpx.Client, service: str) -> dict[str, str]:
    return dict(http.get("/api/stats").json()["services"][service]["instance_states"])


def test_a_burst_scales_up_to_max_then_back_to_min(tmp_path: Path, shared_store: str) -> None:
    with running_system([SCORE], shared_store, tmp_path) as system:
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
        assert peak == 4 and peak_at is not None and peak_at < 2.0, (peak, peak_at)
        # The service time is measured per job in the worker: about the 20 ms slept.
        service_time = http.get("/api/stats").json()["services"]["burst"]["service_time"]
        assert 0.019 <= service_time < 0.2, service_time
        deadline = time.monotonic() + 15
        while instances(http, "burst") > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert instances(http, "burst") == 1  # back to min_instances after idle_timeout
        events = http.get("/api/events/scaling").json()["events"]
        burst = [(e["from"], e["to"]) for e in events if e["service"] == "burst"]
        assert burst[0][0] == 1 and burst[0][1] > 1 and burst[-1][1] == 1, burst
        assert all(e["reason"] for e in events)
        http.close()


def test_a_service_that_is_off_cold_starts_for_a_request(tmp_path: Path, shared_store: str) -> None:
    with running_system([SCORE], shared_store, tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        assert instances(http, "sleeper") == 0
        body = {"todo": ["sleeper"], "input": {"task": "t", "value": 1}}
        done = http.post("/api/requests", params={"wait": 20}, json=body).json()
        assert done["status"] == "COMPLETE" and done["result"] == "t(1)"
        events = http.get("/api/events/scaling").json()["events"]
        assert any(e["service"] == "sleeper" and e["from"] == 0 for e in events), events
        shown = bach("status", "--server", system.url)
        assert shown.returncode == 0 and "still to run 0" in shown.stdout
        assert "sleeper 0 -> 1 (cold start" in shown.stdout, shown.stdout
        # The instance is up, holding no job: the table counts it as idle.
        assert re.search(r"sleeper\s+0\s+0\s+1 \(1 idle\)", shown.stdout), shown.stdout
        # Busy while it holds a job, idle the moment the job is done (not a tick later).
        body = {"todo": ["sleeper"], "input": {"task": "t", "value": 2, "sleep": 1.0}}
        rid = http.post("/api/requests", json=body).json()["id"]
        deadline = time.monotonic() + 10
        while "busy" not in states(http, "sleeper").values() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(states(http, "sleeper").values()) == ["busy"]
        done = http.get(f"/api/requests/{rid}", params={"wait": 20}).json()
        assert done["status"] == "COMPLETE"
        assert list(states(http, "sleeper").values()) == ["idle"]
        http.close()


def test_stats_add_up_while_requests_run_and_metrics_match(
    tmp_path: Path, shared_store: str
) -> None:
    with running_system([FIXTURES / "svc.yaml"], shared_store, tmp_path) as system:
        http = httpx.Client(base_url=system.url, timeout=30)
        for i in range(100):
            http.post("/api/requests", json={"rubric": "slow3", "input": i})
        samples = 0
        while True:
            stats = http.get("/api/stats").json()
            active = stats["active_requests"]
            if not active:
                break
            svc = stats["services"]
            queued = sum(s["queued"] + s["delayed"] for s in svc.values())
            running = sum(s["running"] for s in svc.values())
            assert running == stats["active_tasks"] and queued >= stats["queued_tasks"]
            outstanding = queued + running + stats["reports_waiting"] + stats["tasks_to_run"]
            # Each active request has 1 to 3 of its tasks not done (two separate reads,
            # so a request may end between them: only the upper bound is exact).
            assert outstanding <= 3 * active + 3, stats
            assert stats["tasks_to_run"] <= 2 * active, stats
            samples += 1
            time.sleep(0.05)
        assert samples >= 3
        final = http.get("/api/stats").json()
        assert final["requests"] == {"COMPLETE": 100}
        assert final["tasks_to_run"] == 0 and final["queued_tasks"] == 0
        assert [final["services"][s]["completed"] for s in "PQR"] == [100, 100, 100]
        states = final["services"]["P"]["instance_states"]
        assert len(states) == final["services"]["P"]["instances"]
        assert set(states.values()) <= {"idle", "busy"}
        text = http.get("/metrics").text
        assert "bach_active_requests 0.0" in text
        assert 'bach_service_completed{service="P"} 100.0' in text
        # With the work done, every instance is idle once the supervisor's next tick saw it.
        deadline = time.monotonic() + 5
        while True:
            services = http.get("/api/stats").json()["services"]
            if set(services["P"]["instance_states"].values()) == {"idle"}:
                break
            assert time.monotonic() < deadline, services["P"]
            time.sleep(0.1)
        idle = services["P"]["instances"]
        text = http.get("/metrics").text
        assert f'bach_service_instances_by_state{{service="P",state="idle"}} {idle}.0' in text
        assert 'bach_service_instances_by_state{service="P",state="busy"} 0.0' in text
        http.close()

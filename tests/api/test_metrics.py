"""/metrics: the stats gauges and the engine's counters, in one Prometheus document."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bach.api.app import create_app
from bach.backends import open_backend
from bach.core.score import load_scores
from bach.runtime import metrics
from bach.runtime.engine import Engine
from tests.helpers import EXAMPLES, System, running_system

COUNTERS = {
    "bach_requests_submitted": "counter",
    "bach_requests": "counter",
    "bach_jobs": "counter",
    "bach_job_retries": "counter",
    "bach_job_duration_seconds": "histogram",
}
GAUGES = ("bach_active_requests", "bach_queued_tasks", "bach_service_queued")


def parse(text: str) -> dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    """Every family: its type and its samples by (name, labels). Fails on a name that
    is described twice, which Prometheus refuses."""
    described = Counter(
        tuple(line.split()[1:3])
        for line in text.splitlines()
        if line.startswith(("# HELP", "# TYPE"))
    )
    assert [entry for entry, n in described.items() if n > 1] == []
    return {
        family.name: (
            family.type,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
    }


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The real app on an engine of its own, in this process, counting from zero."""
    metrics.reset()
    backend = open_backend("memory://")
    engine = Engine(backend, load_scores([EXAMPLES / "arith.yaml"]))
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://bach") as client:
        yield client
    await backend.close()
    metrics.reset()


async def test_what_the_engine_counts_is_served_with_the_gauges(http: httpx.AsyncClient) -> None:
    metrics.request_submitted()
    metrics.request_submitted()
    metrics.request_ended("COMPLETE")
    metrics.request_ended("FAILED")
    metrics.job_finished("A", "ok", 0.02)
    metrics.job_finished("A", "ok", 3.0)
    metrics.job_finished("B", "failed", 0.5)
    metrics.job_finished("B", "lost", None)  # no measured time: not in the histogram
    metrics.job_retried("B")

    response = await http.get("/metrics")
    assert response.status_code == 200
    found = parse(response.text)

    assert {name: found[name][0] for name in COUNTERS} == COUNTERS
    assert all(found[name][0] == "gauge" for name in GAUGES)  # the stats keep their names
    assert found["bach_requests_submitted"][1] == {("bach_requests_submitted_total", ()): 2.0}
    ended = found["bach_requests"][1]
    assert ended == {
        ("bach_requests_total", (("status", "CANCELLED"),)): 0.0,
        ("bach_requests_total", (("status", "COMPLETE"),)): 1.0,
        ("bach_requests_total", (("status", "FAILED"),)): 1.0,
    }
    jobs = found["bach_jobs"][1]
    assert jobs[("bach_jobs_total", (("outcome", "ok"), ("service", "A")))] == 2.0
    assert jobs[("bach_jobs_total", (("outcome", "failed"), ("service", "B")))] == 1.0
    assert jobs[("bach_jobs_total", (("outcome", "lost"), ("service", "B")))] == 1.0
    assert jobs[("bach_jobs_total", (("outcome", "ok"), ("service", "B")))] == 0.0  # declared
    assert found["bach_job_retries"][1] == {
        ("bach_job_retries_total", (("service", "A"),)): 0.0,
        ("bach_job_retries_total", (("service", "B"),)): 1.0,
    }
    duration = found["bach_job_duration_seconds"][1]
    a = (("service", "A"),)
    assert duration[("bach_job_duration_seconds_count", a)] == 2.0
    assert duration[("bach_job_duration_seconds_sum", a)] == pytest.approx(3.02)
    assert duration[("bach_job_duration_seconds_bucket", (("le", "0.025"), *a))] == 1.0
    assert duration[("bach_job_duration_seconds_bucket", (("le", "5.0"), *a))] == 2.0
    assert duration[("bach_job_duration_seconds_count", (("service", "B"),))] == 1.0
    assert not any(name.endswith("_created") for name, _ in duration)


async def test_a_wrong_status_or_outcome_is_refused_not_counted(http: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match="RUNNING"):
        metrics.request_ended("RUNNING")
    with pytest.raises(ValueError, match="done"):
        metrics.job_finished("A", "done", 1.0)
    found = parse((await http.get("/metrics")).text)
    assert set(found["bach_requests"][1].values()) == {0.0}
    assert set(found["bach_jobs"][1].values()) == {0.0}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    home: Path = tmp_path_factory.mktemp("metrics")
    with running_system([EXAMPLES / "arith.yaml"], f"sqlite:///{home}/bach.db", home) as found:
        yield found


@pytest.mark.slow
def test_a_real_system_serves_every_family_once(system: System) -> None:
    text = httpx.get(f"{system.url}/metrics", timeout=30).text
    found = parse(text)
    assert {name: found[name][0] for name in COUNTERS} == COUNTERS
    assert all(found[name][0] == "gauge" for name in GAUGES)
    jobs = found["bach_jobs"][1]
    for service in ("A", "B"):
        for outcome in ("ok", "failed", "lost"):
            assert (
                "bach_jobs_total",
                (("outcome", outcome), ("service", service)),
            ) in jobs
    assert "_created" not in text


@pytest.mark.slow
def test_a_real_system_counts_requests_and_jobs(system: System) -> None:
    done = httpx.post(
        f"{system.url}/api/requests",
        params={"wait": 20},
        json={"input": 5, "todo": ["A", "B"]},
        timeout=60,
    ).json()
    assert done["status"] == "COMPLETE"
    found = parse(httpx.get(f"{system.url}/metrics", timeout=30).text)
    assert found["bach_requests_submitted"][1][("bach_requests_submitted_total", ())] >= 1
    assert found["bach_requests"][1][("bach_requests_total", (("status", "COMPLETE"),))] >= 1
    jobs = found["bach_jobs"][1]
    for service in ("A", "B"):
        assert jobs[("bach_jobs_total", (("outcome", "ok"), ("service", service)))] >= 1
        count = ("bach_job_duration_seconds_count", (("service", service),))
        assert found["bach_job_duration_seconds"][1][count] >= 1

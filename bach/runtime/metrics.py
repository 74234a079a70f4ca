"""What the engine counts as it applies events: requests in and out, jobs, retries, and
how long jobs ran. ``/metrics`` serves these with the gauges of ``/api/stats``.

Counted by the engine of this process when it applies a report or a client's change,
so several ``bach serve`` on one store each count their own share: Prometheus sums them.
They live in a registry of this module's own, not prometheus_client's global one;
``reset()`` gives tests a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

ENDED = ("COMPLETE", "FAILED", "CANCELLED")
OUTCOMES = ("ok", "failed", "lost")
#: Seconds, from a quick handler to the default timeout of one attempt (300 s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Meters:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "bach_requests_submitted", "requests accepted", registry=self.registry
        )
        self.ended = Counter(
            "bach_requests", "requests that ended, by status", ["status"], registry=self.registry
        )
        self.jobs = Counter(
            "bach_jobs",
            "job attempts that ended, by service and outcome (ok, failed, lost)",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "bach_job_retries", "jobs queued again after a failed or lost attempt",
            ["service"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "bach_job_duration_seconds",
            "seconds a job attempt ran in its worker",
            ["service"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        for status in ENDED:  # every status is a series from the start, at 0
            self.ended.labels(status)


_meters = _Meters()


def request_submitted() -> None:
    """A new request was accepted (not one returned again for a key used before)."""
    _meters.submitted.inc()


def request_ended(status: str) -> None:
    """A request reached COMPLETE, FAILED or CANCELLED."""
    if status not in ENDED:
        raise ValueError(f"{status!r} is not an end of a request ({', '.join(ENDED)})")
    _meters.ended.labels(status).inc()


def job_finished(service: str, outcome: str, seconds: float | None) -> None:
    """One attempt of a job of ``service`` ended: ``ok``, ``failed`` or ``lost`` (its
    worker died or its lease ran out); ``seconds`` it ran (None: not measured, such as a
    lost attempt, which then stays out of the histogram)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"{outcome!r} is not a job outcome ({', '.join(OUTCOMES)})")
    _meters.jobs.labels(service, outcome).inc()
    if seconds is not None:
        _meters.duration.labels(service).observe(max(0.0, seconds))


def job_retried(service: str) -> None:
    """A job of ``service`` was queued again for another attempt."""
    _meters.retries.labels(service).inc()


def declare(services: Iterable[str]) -> None:
    """Give each service its series at 0, so a rate is known before its first job."""
    for service in services:
        for outcome in OUTCOMES:
            _meters.jobs.labels(service, outcome)
        _meters.retries.labels(service)
        _meters.duration.labels(service)


def reset() -> None:
    """Start every count again from 0 (tests)."""
    global _meters
    _meters = _Meters()


class _Current(Collector):
    """The counters as they are at each collection, whatever ``reset`` did since, without
    prometheus_client's ``*_created`` series: they would read as counts (a
    ``bach_requests_created``) and are only the time each series began."""

    def collect(self) -> Iterable[Metric]:
        for metric in _meters.registry.collect():  # fresh objects at each collection
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def collector() -> Collector:
    """For a registry that serves these with other metrics (``/metrics``)."""
    return _Current()

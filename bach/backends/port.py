"""The backend port: what Bach needs from a store, as one Protocol.

Records are plain data; bodies and payloads are JSON text the backend does not read.
Every method is one atomic unit (an SQLite transaction, a Redis script): a transition
either happens whole or not at all, whichever process calls it.

Delivery is at-least-once: a leased job whose lease runs out goes back to its queue.
Application is exactly-once: ``commit`` applies a transition only if the request is
still at the version it was read at, and the state machine ignores reports it has
already applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RequestRecord:
    id: str
    key: str
    status: str
    version: int
    plan_id: str
    #: JSON of the request's header: its state without the parts (``runtime.codec``).
    body: str
    created_at: float
    updated_at: float
    #: Tasks not yet dispatched while the request is active, 0 once it has ended. The
    #: store keeps the sum over all requests (``Stats.to_run``) as records change.
    to_run: int = 0
    #: What is stored apart from the body, by name (the input, one part per job), as
    #: JSON text: a step writes the parts it changed and no other. The store keeps the
    #: version that last wrote each part, so a reader that has a request at one version
    #: reads only the parts written since (``load_many``'s ``since``). In a commit: the
    #: parts that changed. None where parts were not read (listings, reports).
    parts: Mapping[str, str] | None = None


@dataclass(frozen=True)
class JobRecord:
    """One attempt of one task, as it sits on its service's queue."""

    id: str
    request_id: str
    task: str
    attempt: int
    service: str
    #: JSON of the task's input.
    payload: str
    available_at: float
    timeout: float


@dataclass(frozen=True)
class Lease:
    job: JobRecord
    worker: str
    until: float
    #: How many times this job has been handed to a worker, this time included.
    deliveries: int
    #: Earlier deliveries that ended without a report: ``worker``, ``reason`` ("worker
    #: died", "lease expired") and ``at``. A clean give-back (``release``) is not one.
    lost: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Report:
    """A worker's outcome for one job: the completion channel's unit."""

    job_id: str
    request_id: str
    task: str
    attempt: int
    ok: bool
    #: JSON of the result when ok, else the error message.
    payload: str
    worker: str
    at: float
    retryable: bool = True
    #: Seconds the job ran in the worker (0.0 when not measured).
    elapsed: float = 0.0
    #: JSON the worker recorded of the attempt (error type, traceback, stderr, start,
    #: lost deliveries); the store keeps it as it is.
    info: str = ""


@dataclass(frozen=True)
class Transition:
    """One atomic step of one request."""

    request_id: str
    expected_version: int
    #: The new header (its version is expected_version + 1) with the parts that changed
    #: (the others stay as they are), or None if the request is unchanged.
    record: RequestRecord | None
    enqueue: tuple[JobRecord, ...] = ()
    #: Reports this step has applied; they leave the completion channel with it.
    consumed: tuple[str, ...] = ()
    #: Remove this request's jobs, queued and leased: a worker holding one learns at its
    #: next ``extend`` that it no longer does, and stops it.
    withdraw: bool = False


@dataclass(frozen=True)
class QueueStats:
    queued: int = 0
    delayed: int = 0
    running: int = 0
    oldest_queued_at: float | None = None
    #: Jobs ever queued for the service in this store, by every engine: arrival rates
    #: come from its differences.
    enqueued: int = 0
    #: Jobs reported done / failed (each attempt once), by every worker.
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    queues: dict[str, QueueStats] = field(default_factory=dict)
    reports: int = 0
    #: Holder of each lease, by worker id.
    workers: dict[str, int] = field(default_factory=dict)
    #: Tasks of the active requests not dispatched yet (the sum of their ``to_run``).
    to_run: int = 0


class Backend(Protocol):
    """Storage, queues and the completion channel."""

    url: str

    async def create(
        self, record: RequestRecord, plan_id: str, plan: str, jobs: Sequence[JobRecord]
    ) -> tuple[RequestRecord, bool]:
        """Store a new request with its plan and first jobs. If a request with the same
        key exists, store nothing and return it with False."""
        ...

    async def load(self, ref: str) -> RequestRecord | None:
        """A request by id, or else by tracking key, with all its parts."""
        ...

    async def load_many(
        self, ids: Sequence[str], since: Mapping[str, int] | None = None
    ) -> dict[str, RequestRecord]:
        """Requests by id, each with the parts written after version ``since[id]`` (all
        parts for an id not in ``since``), read in one atomic unit with the header."""
        ...

    async def list_requests(
        self, status: str | None = None, limit: int = 100, before: float | None = None
    ) -> list[RequestRecord]:
        """Newest first, optionally only those with one status or created before a time;
        headers only (``parts`` is None)."""
        ...

    async def plan(self, plan_id: str) -> str | None: ...

    async def commit(self, transitions: Sequence[Transition]) -> list[bool]:
        """Apply each transition atomically; False where the version no longer matched."""
        ...

    async def lease(
        self,
        service: str,
        worker: str,
        now: float,
        ttl: float,
        limit: int = 1,
        done: Sequence[Report] = (),
    ) -> list[Lease]:
        """Hand out up to ``limit`` available jobs of a service, oldest first. Reports in
        ``done`` are reported first (as ``report`` does), in the same atomic unit: a busy
        worker hands in results and takes new work in one round trip."""
        ...

    async def extend(self, job_ids: Sequence[str], worker: str, until: float) -> list[str]:
        """Push out leases this worker still holds; returns the ids it no longer holds."""
        ...

    async def leased(self, request_id: str) -> dict[str, str]:
        """The tasks of a request that workers hold right now, with the worker of each."""
        ...

    async def report(self, reports: Sequence[Report]) -> None:
        """Ack the jobs and put their outcomes on the completion channel, atomically."""
        ...

    async def release(self, job_ids: Sequence[str], worker: str) -> int:
        """Give leased jobs back untouched (a clean shutdown): not counted as delivered."""
        ...

    async def release_worker(self, worker: str) -> int:
        """Requeue every job a (dead) worker holds."""
        ...

    async def reports(self, limit: int) -> list[Report]:
        """Oldest outcomes not yet applied."""
        ...

    async def reports_with_requests(
        self, limit: int
    ) -> tuple[list[Report], dict[str, RequestRecord]]:
        """``reports(limit)`` and the headers of the requests they belong to (``parts`` is
        None), read in one go: the engine's read side in one round trip when it holds
        the requests at those versions already."""
        ...

    async def requeue_expired(self, now: float) -> int:
        """Put jobs whose lease ran out back on their queues."""
        ...

    async def purge(self, ended_before: float, limit: int = 1000) -> int:
        """Forget up to ``limit`` ended requests (COMPLETE, FAILED, CANCELLED) last changed
        before ``ended_before``; returns how many. Retention, so a store does not grow
        without end."""
        ...

    async def stats(self, now: float) -> Stats: ...

    async def announce(
        self, supervisor: str, instances: Mapping[str, int], until: float, now: float
    ) -> dict[str, dict[str, int]]:
        """Say that ``supervisor`` is alive until ``until`` and runs ``instances`` (per
        service); returns every supervisor alive at ``now``, this one included, with the
        instances it said it runs. ``until <= now`` withdraws it. How supervisors on one
        store share the system's instances."""
        ...

    async def present(self, worker: str, info: str, until: float, now: float) -> None:
        """Say that ``worker`` is alive until ``until``, with ``info`` (JSON: host, pid,
        services, since, jobs done); ``until <= now`` withdraws it."""
        ...

    async def present_workers(self, now: float) -> dict[str, str]:
        """The info of every worker alive at ``now``, by worker id; forgets the others."""
        ...

    async def wait_jobs(self, service: str, timeout: float) -> None:
        """Return when jobs of this service may have arrived, or after timeout."""
        ...

    async def wait_reports(self, timeout: float) -> None:
        """Return when reports may have arrived, or after timeout."""
        ...

    async def wait_ended(self, timeout: float) -> list[str]:
        """Ids of requests that ended (in any process) since the last call, waiting up to
        ``timeout`` for one. A backend that cannot tell returns [] after the timeout, and
        waiters for requests another engine ends fall back to polling."""
        ...

    async def close(self) -> None: ...

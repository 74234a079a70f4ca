"""An in-process backend for tests and single-process runs. Nothing survives the process.

Everything runs on the event loop, so each method is atomic by construction.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bach.backends.port import (
    JobRecord,
    Lease,
    QueueStats,
    Report,
    RequestRecord,
    Stats,
    Transition,
)

TERMINAL = ("COMPLETE", "FAILED", "CANCELLED")


@dataclass
class _Slot:
    job: JobRecord
    seq: int
    worker: str | None = None
    until: float = 0.0
    deliveries: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)


class _Signal:
    """Wake-ups that are never lost: a set before a wait makes the wait return at once."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def ring(self, topic: str) -> None:
        self._events[topic].set()

    async def wait(self, topic: str, timeout: float) -> None:
        event = self._events[topic]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        event.clear()


class MemoryBackend:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        #: Headers (``parts`` None), and each request's parts with the version that wrote
        #: each.
        self._requests: dict[str, RequestRecord] = {}
        self._parts: dict[str, dict[str, tuple[int, str]]] = {}
        self._keys: dict[str, str] = {}
        self._plans: dict[str, str] = {}
        self._jobs: dict[str, _Slot] = {}
        self._reports: dict[str, Report] = {}
        self._seq = 0
        self._arrivals: Counter[str] = Counter()
        self._outcomes: Counter[tuple[str, bool]] = Counter()
        self._to_run = 0
        self._supervisors: dict[str, tuple[float, dict[str, int]]] = {}
        self._present: dict[str, tuple[float, str]] = {}
        self._signal = _Signal()

    async def create(
        self, record: RequestRecord, plan_id: str, plan: str, jobs: Sequence[JobRecord]
    ) -> tuple[RequestRecord, bool]:
        existing = self._keys.get(record.key)
        if existing is not None:
            return self._whole(existing), False
        self._plans.setdefault(plan_id, plan)
        self._store(record, {})
        self._keys[record.key] = record.id
        self._to_run += record.to_run
        self._enqueue(jobs)
        return record, True

    def _store(self, record: RequestRecord, parts: dict[str, tuple[int, str]]) -> None:
        for name, text in (record.parts or {}).items():
            parts[name] = (record.version, text)
        self._parts[record.id] = parts
        self._requests[record.id] = replace(record, parts=None)

    def _whole(self, rid: str, since: int = -1) -> RequestRecord:
        parts = {name: text for name, (v, text) in self._parts[rid].items() if v > since}
        return replace(self._requests[rid], parts=parts)

    async def load(self, ref: str) -> RequestRecord | None:
        rid = ref if ref in self._requests else self._keys.get(ref)
        return None if rid is None else self._whole(rid)

    async def load_many(
        self, ids: Sequence[str], since: Mapping[str, int] | None = None
    ) -> dict[str, RequestRecord]:
        since = since or {}
        return {i: self._whole(i, since.get(i, -1)) for i in ids if i in self._requests}

    async def list_requests(
        self, status: str | None = None, limit: int = 100, before: float | None = None
    ) -> list[RequestRecord]:
        rows = [
            r
            for r in self._requests.values()
            if (status is None or r.status == status) and (before is None or r.created_at < before)
        ]
        rows.sort(key=lambda r: r.created_at, reverse=True)
        return rows[:limit]

    async def plan(self, plan_id: str) -> str | None:
        return self._plans.get(plan_id)

    async def commit(self, transitions: Sequence[Transition]) -> list[bool]:
        return [self._apply(t) for t in transitions]

    def _apply(self, t: Transition) -> bool:
        if t.record is not None:
            current = self._requests.get(t.request_id)
            if current is None or current.version != t.expected_version:
                return False
            self._store(t.record, self._parts[t.request_id])
            self._to_run += t.record.to_run - current.to_run
        for job_id in t.consumed:
            self._reports.pop(job_id, None)
        if t.withdraw:
            for job_id, slot in list(self._jobs.items()):
                if slot.job.request_id == t.request_id:
                    del self._jobs[job_id]
        self._enqueue(t.enqueue)
        return True

    def _enqueue(self, jobs: Sequence[JobRecord]) -> None:
        for job in jobs:
            if job.id not in self._jobs:
                self._seq += 1
                self._jobs[job.id] = _Slot(job, self._seq)
                self._arrivals[job.service] += 1
                self._signal.ring("jobs:" + job.service)

    async def lease(
        self,
        service: str,
        worker: str,
        now: float,
        ttl: float,
        limit: int = 1,
        done: Sequence[Report] = (),
    ) -> list[Lease]:
        await self.report(done)
        ready = sorted(
            (
                s
                for s in self._jobs.values()
                if s.job.service == service and s.worker is None and s.job.available_at <= now
            ),
            key=lambda s: (s.job.available_at, s.seq),
        )[:limit]
        leases = []
        for slot in ready:
            slot.worker, slot.until = worker, now + ttl
            slot.deliveries += 1
            leases.append(Lease(slot.job, worker, slot.until, slot.deliveries, tuple(slot.lost)))
        return leases

    async def extend(self, job_ids: Sequence[str], worker: str, until: float) -> list[str]:
        lost = []
        for job_id in job_ids:
            slot = self._jobs.get(job_id)
            if slot is None or slot.worker != worker:
                lost.append(job_id)
            else:
                slot.until = until
        return lost

    async def leased(self, request_id: str) -> dict[str, str]:
        return {
            s.job.task: s.worker
            for s in self._jobs.values()
            if s.job.request_id == request_id and s.worker is not None
        }

    async def report(self, reports: Sequence[Report]) -> None:
        for report in reports:
            slot = self._jobs.pop(report.job_id, None)
            if slot is not None:
                self._outcomes[slot.job.service, report.ok] += 1
            self._reports.setdefault(report.job_id, report)
        if reports:
            self._signal.ring("reports")

    async def release(self, job_ids: Sequence[str], worker: str) -> int:
        released = 0
        for job_id in job_ids:
            slot = self._jobs.get(job_id)
            if slot is not None and slot.worker == worker:
                slot.worker, slot.until = None, 0.0
                slot.deliveries -= 1
                released += 1
                self._signal.ring("jobs:" + slot.job.service)
        return released

    async def release_worker(self, worker: str) -> int:
        return self._requeue(lambda s: s.worker == worker, "worker died", time.time())

    async def requeue_expired(self, now: float) -> int:
        return self._requeue(lambda s: s.worker is not None and s.until < now, "lease expired", now)

    def _requeue(self, match: Callable[[_Slot], bool], reason: str, now: float) -> int:
        slots = [s for s in self._jobs.values() if match(s)]
        for slot in slots:
            slot.lost.append({"worker": slot.worker, "reason": reason, "at": now})
            slot.worker, slot.until = None, 0.0
            self._signal.ring("jobs:" + slot.job.service)
        return len(slots)

    async def reports_with_requests(
        self, limit: int
    ) -> tuple[list[Report], dict[str, RequestRecord]]:
        reports = await self.reports(limit)
        found = (self._requests.get(r.request_id) for r in reports)
        return reports, {r.id: r for r in found if r is not None}

    async def purge(self, ended_before: float, limit: int = 1000) -> int:
        old = [
            r
            for r in self._requests.values()
            if r.status in TERMINAL and r.updated_at < ended_before
        ][:limit]
        for record in old:
            self._to_run -= record.to_run
            del self._requests[record.id]
            del self._parts[record.id]
            self._keys.pop(record.key, None)
        return len(old)

    async def reports(self, limit: int) -> list[Report]:
        return list(self._reports.values())[:limit]

    async def announce(
        self, supervisor: str, instances: Mapping[str, int], until: float, now: float
    ) -> dict[str, dict[str, int]]:
        self._supervisors[supervisor] = (until, dict(instances))
        for name, (alive_until, _) in list(self._supervisors.items()):
            if alive_until <= now:
                del self._supervisors[name]
        return {name: counts for name, (_, counts) in self._supervisors.items()}

    async def present(self, worker: str, info: str, until: float, now: float) -> None:
        self._present[worker] = (until, info)
        await self.present_workers(now)

    async def present_workers(self, now: float) -> dict[str, str]:
        for name, (until, _) in list(self._present.items()):
            if until <= now:
                del self._present[name]
        return {name: info for name, (_, info) in self._present.items()}

    async def stats(self, now: float) -> Stats:
        counts: dict[str, int] = defaultdict(int)
        for record in self._requests.values():
            counts[record.status] += 1
        queues: dict[str, QueueStats] = {}
        workers: dict[str, int] = defaultdict(int)
        for slot in self._jobs.values():
            q = queues.get(slot.job.service, QueueStats())
            if slot.worker is not None:
                q = replace(q, running=q.running + 1)
                workers[slot.worker] += 1
            elif slot.job.available_at > now:
                q = replace(q, delayed=q.delayed + 1)
            else:
                oldest = slot.job.available_at
                if q.oldest_queued_at is not None:
                    oldest = min(oldest, q.oldest_queued_at)
                q = replace(q, queued=q.queued + 1, oldest_queued_at=oldest)
            queues[slot.job.service] = q
        for service, count in self._arrivals.items():
            queues[service] = replace(
                queues.get(service, QueueStats()),
                enqueued=count,
                completed=self._outcomes[service, True],
                failed=self._outcomes[service, False],
            )
        return Stats(dict(counts), queues, len(self._reports), dict(workers), self._to_run)

    async def wait_jobs(self, service: str, timeout: float) -> None:
        await self._signal.wait("jobs:" + service, timeout)

    async def wait_reports(self, timeout: float) -> None:
        await self._signal.wait("reports", timeout)

    async def wait_ended(self, timeout: float) -> list[str]:
        # One engine per process: it wakes its own waiters as it ends requests.
        await asyncio.sleep(timeout)
        return []

    async def close(self) -> None:
        return None

"""A worker: takes jobs of one service from its queue, runs them, reports the outcome.

It holds each job under a lease that it renews while the job runs; if the worker dies,
the lease runs out (or the supervisor notices at once) and the job goes back on the
queue. On stop it finishes what it holds, and gives back what it cannot finish in time
without counting it as an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from bach.backends.port import Backend, Lease, Report
from bach.core.score import Service
from bach.runtime.engine import worker_id
from bach.runtime.invoke import Invoker, Outcome

log = logging.getLogger("bach.worker")

#: A job handed out this many times without a report is failed instead of run again.
MAX_DELIVERIES = 5


class Worker:
    def __init__(
        self,
        backend: Backend,
        service: Service,
        *,
        ident: str | None = None,
        concurrency: int = 1,
        lease_ttl: float = 15.0,
        poll: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.service = service
        self.id = ident or worker_id(service.name)
        self.concurrency = max(1, concurrency)
        self.lease_ttl = lease_ttl
        self.poll = poll
        self.clock = clock
        self.invoke = Invoker(service)
        self.done = 0
        self._held: dict[str, Lease] = {}
        self._stopping = asyncio.Event()
        #: Set when a sync handler overran its timeout: its thread cannot be stopped, so
        #: the worker leaves after reporting and the supervisor starts a fresh one.
        self.tainted = False

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, parent_pid: int | None = None) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(parent_pid))
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(running)
                if free <= 0:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                leases = await self.backend.lease(
                    self.service.name, self.id, self.clock(), self.lease_ttl, limit=free
                )
                if not leases:
                    await self._idle()
                    continue
                for lease in leases:
                    self._held[lease.job.id] = lease
                    task = asyncio.create_task(self._run_one(lease))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if self.concurrency == 1:
                    await asyncio.wait(running)
        finally:
            if running:
                await asyncio.wait(running)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _idle(self) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        jobs = asyncio.create_task(self.backend.wait_jobs(self.service.name, self.poll))
        await asyncio.wait({stop, jobs}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        jobs.cancel()

    async def _run_one(self, lease: Lease) -> None:
        job = lease.job
        if lease.deliveries > MAX_DELIVERIES:
            outcome = Outcome(
                False,
                f"handed to a worker {lease.deliveries - 1} times without"
                " a result (did the worker die each time?)",
                retryable=False,
            )
        else:
            outcome = await self.invoke(job.payload, job.timeout)
        report = Report(
            job.id,
            job.request_id,
            job.task,
            job.attempt,
            outcome.ok,
            outcome.payload,
            self.id,
            self.clock(),
            outcome.retryable,
        )
        await self._report(report)
        self._held.pop(job.id, None)
        self.done += 1
        if outcome.timed_out and self.service.spec.handler is not None:
            self.tainted = True
            self.stop()

    async def _report(self, report: Report) -> None:
        # A result is worth keeping: if the store is briefly unavailable, try again.
        delay = 0.1
        while True:
            try:
                await self.backend.report([report])
                return
            except Exception as exc:
                log.warning("could not report %s (%s); retrying", report.job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self, parent_pid: int | None) -> None:
        interval = min(self.lease_ttl / 3, 1.0)
        while True:
            await asyncio.sleep(interval)
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker %s: parent %d is gone; stopping", self.id, parent_pid)
                self.stop()
            if self._held:
                with contextlib.suppress(Exception):
                    await self.backend.extend(
                        list(self._held), self.id, self.clock() + self.lease_ttl
                    )

    async def release_held(self) -> int:
        """Give back every job still held (shutdown timed out)."""
        if not self._held:
            return 0
        return await self.backend.release(list(self._held), self.id)


async def drain(worker: Worker, task: asyncio.Task[None], grace: float) -> None:
    """Stop a worker: let it finish within ``grace`` seconds, then give its jobs back."""
    worker.stop()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        released = await worker.release_held()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.warning("worker %s stopped after %gs; %d job(s) given back", worker.id, grace, released)

"""A worker: takes jobs of one service from its queue, runs them, reports the outcome.

It holds each job under a lease that it renews while the job runs; if the worker dies,
the lease runs out (or the supervisor notices at once) and the job goes back on the
queue. On stop it finishes what it holds, and gives back what it cannot finish in time
without counting it as an attempt. A job the store no longer lets it hold (its request
was cancelled or failed, or its lease ran out and it went to another worker) is stopped
at the next heartbeat, within a second, and not reported.

Each report carries what the worker saw of the attempt (``Report.info``): this
instance (host, pid, service), when it started, the error's type, message and traceback
or stderr, and the deliveries of the job that were lost before it.

Short jobs are cheap to hand out in batches: the worker keeps an estimate of how long a
job takes and, when jobs are fast, takes several at once (never more than about
``BATCH_TIME`` seconds of work) and hands in their results with its next request for
work, in one round trip. A result never waits more than ``FLUSH_AFTER`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bach.backends.port import Backend, Lease, Report
from bach.core.limits import DEFAULTS, Limits
from bach.core.score import Service
from bach.runtime import logs
from bach.runtime.engine import HOST, worker_id
from bach.runtime.invoke import Invoker, Outcome, failure

log = logging.getLogger("bach.worker")

#: A job handed out this many times without a report is failed instead of run again.
MAX_DELIVERIES = 5
#: Seconds of work one worker slot takes at once when jobs are short.
BATCH_TIME = 0.01
#: Most jobs one slot takes at once.
MAX_PREFETCH = 16
#: Longest a finished job's result waits to be handed in with the next lease.
FLUSH_AFTER = 0.02
#: Seconds a worker stays listed (``Backend.present``) after its last heartbeat.
PRESENCE_TTL = 5.0


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
        limits: Limits = DEFAULTS,
    ) -> None:
        self.backend = backend
        self.service = service
        self.id = ident or worker_id(service.name)
        self.concurrency = max(1, concurrency)
        self.lease_ttl = lease_ttl
        self.poll = poll
        self.clock = clock
        self.invoke = Invoker(service, limits)
        self.done = 0
        self.since = clock()
        #: Started by a supervisor (True) or by hand with ``bach worker``.
        self.supervised = False
        #: Jobs leased and not yet reported, started or not.
        self._held: dict[str, Lease] = {}
        self._backlog: deque[Lease] = deque()
        self._running: set[asyncio.Task[None]] = set()
        #: The running task of each job, to stop it when the job is withdrawn.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unreported: list[Report] = []
        self._oldest_unreported = 0.0
        self._job_time: float | None = None
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        #: Set when the heartbeat must end.
        self._quiet = asyncio.Event()
        #: Set when a sync handler overran its timeout: its thread cannot be stopped, so
        #: the worker leaves after reporting and the supervisor starts a fresh one.
        self.tainted = False

    def stop(self) -> None:
        """Finish what is running, take nothing new."""
        self._stopping.set()

    def force(self) -> None:
        """Stop now: what is still running is given back to the queue, uncounted."""
        self._stopping.set()
        self._forced.set()

    def _prefetch(self) -> int:
        if self._job_time is None:
            return 1
        return max(1, min(MAX_PREFETCH, int(BATCH_TIME / max(self._job_time, 1e-5))))

    async def run(self, parent_pid: int | None = None) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(parent_pid))
        try:
            while not self._stopping.is_set():
                while self._backlog and len(self._running) < self.concurrency:
                    self._start(self._backlog.popleft())
                if self._backlog or len(self._running) >= self.concurrency:
                    await self._wait_for_slot()
                    continue
                if not await self._take_work():
                    await self._idle()
        finally:
            await self._wind_down()
            self._quiet.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._present(0.0)  # gone from the listing at once

    def _start(self, lease: Lease) -> None:
        task = asyncio.create_task(self._run_one(lease))
        self._running.add(task)
        self._tasks[lease.job.id] = task
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: self._tasks.pop(lease.job.id, None))

    async def _wait_for_slot(self) -> None:
        await asyncio.wait(self._running, timeout=FLUSH_AFTER, return_when=asyncio.FIRST_COMPLETED)
        if self._unreported and time.monotonic() - self._oldest_unreported >= FLUSH_AFTER:
            await self._flush()

    async def _take_work(self) -> bool:
        """Hand in finished results and lease more jobs, in one call."""
        limit = (self.concurrency - len(self._running)) * self._prefetch()
        done, self._unreported = self._unreported, []
        try:
            leases = await self.backend.lease(
                self.service.name, self.id, self.clock(), self.lease_ttl, limit=limit, done=done
            )
        except Exception as exc:
            self._unreported = done + self._unreported
            log.warning("worker %s: store unavailable (%s); retrying", self.id, exc)
            await asyncio.sleep(0.5)
            return True
        for report in done:
            self._held.pop(report.job_id, None)
        for lease in leases:
            self._held[lease.job.id] = lease
        self._backlog.extend(leases)
        return bool(leases)

    async def _idle(self) -> None:
        if self._unreported:
            await self._flush()
        waits = [
            asyncio.create_task(self._stopping.wait()),
            asyncio.create_task(self.backend.wait_jobs(self.service.name, self.poll)),
        ]
        await asyncio.wait([*waits, *self._running], return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()

    async def _flush(self) -> None:
        done, self._unreported = self._unreported, []
        delay = 0.1
        while done:
            try:
                await self.backend.report(done)
                break
            except Exception as exc:  # a result is worth keeping: try again
                log.warning("worker %s: could not report (%s); retrying", self.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for report in done:
            self._held.pop(report.job_id, None)

    async def _run_one(self, lease: Lease) -> None:
        job = lease.job
        started, started_at = time.monotonic(), self.clock()
        if lease.deliveries > MAX_DELIVERIES or len(lease.lost) > self.service.spec.retries:
            outcome = failure(
                "Lost",
                f"handed to a worker {lease.deliveries - 1} times without"
                " a result (did the worker die each time?)",
                retryable=False,
            )
        else:
            try:
                with logs.job_context(job.request_id, job.task, job.attempt):
                    outcome = await self.invoke(job.payload, job.timeout)
            except asyncio.CancelledError:  # withdrawn, or the worker was forced to stop
                if self.invoke.blocking:
                    self.tainted = True  # its thread runs on: leave, to be replaced
                    self.stop()
                return
        elapsed = time.monotonic() - started
        self._job_time = (
            elapsed if self._job_time is None else (0.8 * self._job_time + 0.2 * elapsed)
        )
        if not self._unreported:
            self._oldest_unreported = time.monotonic()
        self._unreported.append(
            Report(
                job.id,
                job.request_id,
                job.task,
                job.attempt,
                outcome.ok,
                outcome.payload,
                self.id,
                self.clock(),
                outcome.retryable,
                elapsed,
                self._info(lease, started_at, outcome),
            )
        )
        self.done += 1
        if outcome.timed_out and self.service.spec.handler is not None:
            self.tainted = True
            self.stop()

    def _info(self, lease: Lease, started_at: float, outcome: Outcome) -> str:
        info: dict[str, Any] = {
            "worker": self.id,
            "host": HOST,
            "pid": os.getpid(),
            "service": self.service.name,
            "started_at": started_at,
        }
        if outcome.error:
            info["error"] = outcome.error
        if lease.lost:
            info["lost"] = [dict(entry) for entry in lease.lost]
        return json.dumps(info)

    def _withdrawn(self, job_ids: list[str]) -> None:
        """Jobs this worker no longer holds: stop those running, drop those waiting."""
        for job_id in job_ids:
            self._held.pop(job_id, None)
            task = self._tasks.get(job_id)
            if task is not None:
                log.info("worker %s: job %s was withdrawn; stopping it", self.id, job_id)
                task.cancel()
        gone = set(job_ids)
        kept = [lease for lease in self._backlog if lease.job.id not in gone]
        self._backlog.clear()
        self._backlog.extend(kept)

    async def _wind_down(self) -> None:
        """On stop: give back jobs not started, let running ones finish (until force()),
        report what finished and give back what did not."""
        if self._backlog:
            await self.backend.release([lease.job.id for lease in self._backlog], self.id)
            for lease in self._backlog:
                self._held.pop(lease.job.id, None)
            self._backlog.clear()
        forced = asyncio.create_task(self._forced.wait())
        while self._running and not self._forced.is_set():
            await asyncio.wait([*self._running, forced], return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        for task in self._running:
            task.cancel()  # forced: a sync handler's thread runs on, but we leave
        await self._flush()
        if self._held:
            released = await self.backend.release(list(self._held), self.id)
            log.warning(
                "worker %s stopped with %d job(s) unfinished; given back", self.id, released
            )
            self._held.clear()

    def presence(self) -> str:
        """What ``bach status`` shows of this worker."""
        return json.dumps(
            {
                "host": HOST,
                "pid": os.getpid(),
                "services": [self.service.name],
                "concurrency": self.concurrency,
                "since": self.since,
                "jobs_done": self.done,
                "running": len(self._running),
                "supervised": self.supervised,
            }
        )

    async def _present(self, until: float) -> None:
        try:
            await self.backend.present(self.id, self.presence(), until, self.clock())
        except Exception as exc:
            log.warning("worker %s: could not tell the store it is up (%s)", self.id, exc)

    async def _heartbeat(self, parent_pid: int | None) -> None:
        interval = min(self.lease_ttl / 3, 1.0)
        # Not only cancelled: a store client may swallow a cancellation mid-call.
        while not self._quiet.is_set():
            await self._present(self.clock() + PRESENCE_TTL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), interval)
            if self._quiet.is_set():
                return
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker %s: parent %d is gone; stopping", self.id, parent_pid)
                self.stop()
            if self._held:
                try:
                    lost = await self.backend.extend(
                        list(self._held), self.id, self.clock() + self.lease_ttl
                    )
                except Exception as exc:
                    log.warning("worker %s: heartbeat failed (%s)", self.id, exc)
                    continue
                # A job reported a moment ago is no longer held either: only those still
                # unreported are withdrawn.
                reported = {r.job_id for r in self._unreported}
                self._withdrawn([j for j in lost if j in self._held and j not in reported])


async def drain(worker: Worker, task: asyncio.Task[None], grace: float) -> None:
    """Stop a worker: let it finish within ``grace`` seconds, then give its jobs back."""
    worker.stop()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        worker.force()
        await task

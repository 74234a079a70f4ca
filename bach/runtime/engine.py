"""The engine: accepts requests and applies workers' reports to them.

Its completion handler is load, advance, commit: it reads a batch of reports, runs each
through the pure state machine, and commits every request's step in one atomic unit
with the jobs that became ready. A commit that finds the request changed underneath it
(another engine got there first) is dropped and the reports are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import psutil

from bach.backends.port import Backend, Report, RequestRecord, Transition
from bach.commands.runner import CommandRunner, apply_service_reports
from bach.commands.state import PLAN_ID as COMMAND_PLAN
from bach.core import machine
from bach.core.effects import Dispatch, Effect, Withdraw
from bach.core.limits import (
    DEFAULTS,
    Limits,
    check_key,
    encode_json,
    option,
    read_result,
    size_text,
)
from bach.core.machine import Request
from bach.core.rubric import Plan, compile_todo
from bach.core.score import Score
from bach.errors import (
    BachError,
    InvalidInput,
    MappingError,
    NotFound,
    TooLarge,
    UnreadableRecord,
)
from bach.runtime.codec import Plans, to_jobs, to_record

log = logging.getLogger("bach.engine")

#: Reports applied in one step at most.
BATCH = 256
#: Tasks in a request beyond which its submission is worked out off the event loop.
LARGE = 200
#: Characters of a stored request beyond which a step on it runs off the event loop.
OFF_LOOP = 256 * 1024
#: Weight of the newest job in a service's service-time EWMA.
SERVICE_TIME_WEIGHT = 0.1


@dataclass(frozen=True)
class Submission:
    """What a client asks for: exactly one of rubric, client or todo."""

    input: Any = None
    rubric: str | None = None
    client: str | None = None
    todo: Sequence[str] | None = None
    #: A tracking key (an integer is read as its digits).
    key: str | int | None = None


T = TypeVar("T")


def _named(known: Mapping[str, T], field: str, name: str) -> T:
    """Look a name up, or say which names there are."""
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise NotFound(field, f"unknown {field} {name!r} (known: {names})")
    return known[name]


def event_of(report: Report, limits: Limits = DEFAULTS) -> machine.Event:
    """The machine's event for a worker's report. A result that is not JSON Bach can keep
    (NaN, too deep, too large: a worker of another version may send one) fails the job
    for good, with the reason."""
    if not report.ok:
        return machine.JobFailed(report.task, report.attempt, report.payload, report.retryable)
    try:
        value = read_result(report.payload, limits)
    except BachError as exc:
        return machine.JobFailed(
            report.task, report.attempt, f"{exc.field}: {exc.reason}", retryable=False
        )
    return machine.JobDone(report.task, report.attempt, value)


def _read(record: RequestRecord, plan: Plan) -> Request:
    return Request.from_dict(json.loads(record.body), plan)


def _refused(event: machine.Event, reason: str) -> machine.Event:
    if isinstance(event, machine.JobDone):
        return machine.JobFailed(event.task, event.attempt, reason, retryable=False)
    return event


@dataclass(frozen=True)
class Unreadable:
    """A stored record that cannot be turned back into a request, and why."""

    record: RequestRecord
    reason: str


def _read_all(
    records: Sequence[RequestRecord], plans: Mapping[str, Plan | str]
) -> list[Request | Unreadable]:
    found: list[Request | Unreadable] = []
    for record in records:
        plan = plans[record.plan_id]
        try:
            if isinstance(plan, str):
                raise LookupError(plan)
            found.append(_read(record, plan))
        except Exception as exc:  # a record this version cannot read
            found.append(Unreadable(record, f"{type(exc).__name__}: {exc}"[:500]))
    return found


class Engine:
    def __init__(
        self,
        backend: Backend,
        score: Score,
        clock: Callable[[], float] = time.time,
        retain: float | None = None,
        limits: Limits = DEFAULTS,
    ) -> None:
        self.backend = backend
        #: What a request may hold (bach serve's --max-* options).
        self.limits = limits
        self.retain = retain
        #: Runs durable commands, when the system has any.
        self.commands: CommandRunner | None = None
        self.score = score
        self.clock = clock
        self.plans = Plans(backend)
        self._waiters: dict[str, list[asyncio.Future[Request]]] = defaultdict(list)
        self._stopping = asyncio.Event()
        self.applied = 0
        #: Per service: EWMA of the seconds a job ran in its worker, from the reports this
        #: engine applied. (Arrivals and outcomes are counted by the store, for every
        #: engine: ``QueueStats``.)
        self.service_time: dict[str, float] = {}

    # -- requests ------------------------------------------------------------------------

    def plan_for(self, sub: Submission) -> tuple[Plan, str | None]:
        given = [name for name in ("rubric", "client", "todo") if getattr(sub, name) is not None]
        if len(given) != 1:
            raise InvalidInput(
                "rubric",
                "give exactly one of 'rubric', 'client' or 'todo'"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if sub.todo is not None:
            if len(sub.todo) > self.limits.tasks:
                raise InvalidInput(
                    "todo",
                    f"{len(sub.todo)} tasks; at most {self.limits.tasks} are allowed in one "
                    f"request ({option('tasks')})",
                )
            return compile_todo(list(sub.todo), self.score.services), None
        if sub.client is not None:
            client = _named(self.score.clients, "client", sub.client)
            return replace(self.score.rubrics[client.rubric], params=client.params), client.name
        assert sub.rubric is not None
        return _named(self.score.rubrics, "rubric", sub.rubric), None

    async def submit(self, sub: Submission) -> tuple[Request, bool]:
        """Accept a request and dispatch its first tasks, durably, in one step. Returns the
        request and whether it is new (False: the key was already used)."""
        key = None if sub.key is None else check_key(sub.key, self.limits.key)
        if len(sub.todo or ()) > LARGE:  # compiling thousands of tasks: off the event loop
            request, plan, dispatches = await asyncio.to_thread(self._accept, sub, key)
        else:
            request, plan, dispatches = self._accept(sub, key)
        self.plans.remember(plan)
        record = to_record(request)
        if len(record.body) > self.limits.request:
            raise TooLarge(
                "input",
                f"the request would hold {size_text(len(record.body))} with its first tasks' "
                f"inputs; at most {size_text(self.limits.request)} is allowed "
                f"({option('request')})",
            )
        stored, created = await self.backend.create(
            record, plan.digest, json.dumps(plan.to_dict()), to_jobs(dispatches)
        )
        if not created:
            return await self._request(stored), False
        return request, True

    def _accept(self, sub: Submission, key: str | None) -> tuple[Request, Plan, list[Dispatch]]:
        """The new request and its first dispatches (pure: nothing is stored yet)."""
        encode_json(sub.input, "input", self.limits.input, "input", self.limits.depth)
        plan, client = self.plan_for(sub)
        rid = str(uuid.uuid4())
        now = self.clock()
        request = Request(
            id=rid,
            key=key or rid,
            plan=plan,
            input=sub.input,
            created_at=now,
            updated_at=now,
            client=client,
        )
        request, effects = machine.advance(request, machine.Started(), now)
        if request.status == machine.Status.FAILED:
            assert request.error is not None
            raise MappingError(f"input (task {request.error['task']})", request.error["message"])
        return request, plan, [e for e in effects if isinstance(e, Dispatch)]

    async def _request(self, record: RequestRecord) -> Request:
        if record.plan_id == COMMAND_PLAN:
            raise NotFound(
                "request", f"{record.id} is a command run: see /api/commands/{record.id}"
            )
        plan = await self.plans.get(record.plan_id)
        if len(record.body) > OFF_LOOP:
            return await asyncio.to_thread(_read, record, plan)
        return _read(record, plan)

    async def get(self, ref: str) -> Request:
        record = await self.backend.load(ref)
        if record is None:
            raise NotFound("request", f"no request with id or key {ref!r}")
        try:
            return await self._request(record)
        except BachError:
            raise
        except Exception as exc:
            reason = f"the stored record of {record.id} cannot be read: {type(exc).__name__}"
            raise UnreadableRecord("record", f"{reason}: {exc}"[:500]) from exc

    async def wait(self, ref: str, timeout: float, current: Request | None = None) -> Request:
        """The request once it has ended, or as it is when the timeout runs out.
        ``current``: the request as the caller already has it (saves a read)."""
        deadline = time.monotonic() + timeout
        request = current if current is not None else await self.get(ref)
        while not request.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            future: asyncio.Future[Request] = asyncio.get_running_loop().create_future()
            self._waiters[request.id].append(future)
            try:
                # This engine hands over the ended request; another engine may end it,
                # so look again now and then.
                return await asyncio.wait_for(future, min(left, 0.5))
            except TimeoutError:
                request = await self.get(request.id)
        return request

    async def list_requests(
        self, status: str | None, limit: int, before: float | None = None
    ) -> tuple[list[Request | Unreadable], float | None]:
        """Newest first, and where the next page starts (None: this is the last). A record
        that cannot be read is listed as Unreadable, not an error for the whole page."""
        records = await self.backend.list_requests(status, limit, before)
        wanted = [r for r in records if r.plan_id != COMMAND_PLAN]
        plans: dict[str, Plan | str] = {}
        for plan_id in {r.plan_id for r in wanted}:
            try:
                plans[plan_id] = await self.plans.get(plan_id)
            except Exception as exc:  # a plan this version cannot read, or none
                plans[plan_id] = f"{type(exc).__name__}: {exc}"
        if sum(len(r.body) for r in wanted) > 1024 * 1024:
            found = await asyncio.to_thread(_read_all, wanted, plans)
        else:
            found = _read_all(wanted, plans)
        more = records[-1].created_at if len(records) == limit else None
        return found, more

    async def cancel(self, ref: str) -> Request:
        for _ in range(100):
            record = await self.backend.load(ref)
            if record is None:
                raise NotFound("request", f"no request with id or key {ref!r}")
            request = await self._request(record)
            new, _ = machine.advance(request, machine.Cancelled(), self.clock())
            if new is request:
                return request
            new = replace(new, version=request.version + 1)
            step = Transition(request.id, request.version, to_record(new), withdraw=True)
            if (await self.backend.commit([step]))[0]:
                self._wake(new)
                return new
        raise RuntimeError(f"request {ref} kept changing while being cancelled")

    # -- applying reports ----------------------------------------------------------------

    async def step(self) -> int:
        """Apply one batch of reports. Returns how many reports were read."""
        reports, records = await self.backend.reports_with_requests(BATCH)
        if not reports:
            return 0
        grouped: dict[str, list[Report]] = defaultdict(list)
        for report in reports:
            grouped[report.request_id].append(report)
        now = self.clock()
        steps: list[Transition] = []
        ended: dict[str, Request] = {}
        outcomes: dict[str, list[tuple[str, Report]]] = {}
        for rid, batch in grouped.items():
            consumed = tuple(r.job_id for r in batch)
            record = records.get(rid)
            if record is None:  # a report for a request that is gone: drop it
                steps.append(Transition(rid, 0, None, consumed=consumed))
                continue
            if record.plan_id == COMMAND_PLAN:  # a command run's call of a service
                steps.append(apply_service_reports(record, batch, self.score, now, self.limits))
                continue
            plan = await self.plans.get(record.plan_id)
            if len(record.body) > OFF_LOOP:  # parsing and writing it takes a while
                request, new, step = await asyncio.to_thread(
                    self._advance, record, plan, batch, now, consumed
                )
            else:
                request, new, step = self._advance(record, plan, batch, now, consumed)
            tasks = plan.by_name
            outcomes[rid] = [(tasks[r.task].service, r) for r in batch if r.task in tasks]
            steps.append(step)
            if new.terminal and not request.terminal:
                ended[rid] = replace(new, version=request.version + 1)
        results = await self.backend.commit(steps)
        for rid, ok in zip(grouped, results, strict=True):
            if ok and rid in ended:
                self._wake(ended[rid])
            elif ok and self.commands is not None:
                self.commands.notify(rid)
        self.applied += sum(
            len(grouped[rid]) for rid, ok in zip(grouped, results, strict=True) if ok
        )
        self._measure(steps, results, outcomes)
        return len(reports)

    def _measure(
        self,
        steps: Sequence[Transition],
        results: Sequence[bool],
        outcomes: Mapping[str, list[tuple[str, Report]]],
    ) -> None:
        """Service times from the reports of the steps that were committed."""
        for step, ok in zip(steps, results, strict=True):
            if not ok:
                continue
            for service, report in outcomes.get(step.request_id, ()):
                if report.elapsed > 0:
                    old = self.service_time.get(service)
                    self.service_time[service] = (
                        report.elapsed
                        if old is None
                        else old + SERVICE_TIME_WEIGHT * (report.elapsed - old)
                    )

    def _advance(
        self,
        record: RequestRecord,
        plan: Plan,
        batch: Sequence[Report],
        now: float,
        consumed: tuple[str, ...],
    ) -> tuple[Request, Request, Transition]:
        """A request's reports applied: the request before, after, and the transition to
        commit (pure work on the record: it may run in a thread)."""
        request = _read(record, plan)
        events = [event_of(report, self.limits) for report in batch]
        new, step = self._apply(request, events, now, consumed)
        if step.record is not None and len(step.record.body) > self.limits.request:
            # The results would make the request too large to keep: they fail instead.
            reason = (
                f"the request would hold {size_text(len(step.record.body))} of inputs and "
                f"results; at most {size_text(self.limits.request)} is allowed "
                f"({option('request')})"
            )
            events = [_refused(event, reason) for event in events]
            new, step = self._apply(request, events, now, consumed)
        return request, new, step

    def _apply(
        self,
        request: Request,
        events: Sequence[machine.Event],
        now: float,
        consumed: tuple[str, ...],
    ) -> tuple[Request, Transition]:
        new, effects = request, []
        for event in events:
            new, more = machine.advance(new, event, now)
            effects += more
        return new, self._transition(request, new, effects, consumed)

    @staticmethod
    def _transition(
        old: Request, new: Request, effects: list[Effect], consumed: tuple[str, ...]
    ) -> Transition:
        if new is old:
            return Transition(old.id, old.version, None, consumed=consumed)
        new = replace(new, version=old.version + 1)
        dispatches = [e for e in effects if isinstance(e, Dispatch)]
        return Transition(
            old.id,
            old.version,
            to_record(new),
            to_jobs(dispatches),
            consumed,
            withdraw=any(isinstance(e, Withdraw) for e in effects),
        )

    def _wake(self, request: Request) -> None:
        for future in self._waiters.pop(request.id, []):
            if not future.done():
                future.set_result(request)

    async def run(self, poll: float = 0.5, housekeeping: float = 1.0) -> None:
        """Apply reports as they come until stop() is called."""
        watcher = asyncio.create_task(self._watch_ended(), name="ended-watch")
        last_sweep = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if time.monotonic() - last_sweep >= housekeeping:
                        await self.sweep()
                        last_sweep = time.monotonic()
                    if await self.step():
                        continue
                    await self.backend.wait_reports(poll)
                except Exception:
                    log.exception("engine step failed; retrying")
                    await asyncio.sleep(poll)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_ended(self) -> None:
        """Hand requests that other engines end to this engine's waiters."""
        while True:
            try:
                for rid in await self.backend.wait_ended(1.0):
                    if self._waiters.get(rid):
                        self._wake(await self.get(rid))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching for ended requests failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    def stop(self) -> None:
        self._stopping.set()

    async def sweep(self) -> None:
        """Put expired leases back, and at once those of workers on this host that died;
        forget requests that ended longer ago than ``retain``."""
        await self.backend.requeue_expired(self.clock())
        if self.commands is not None:
            await self.commands.heartbeat_due()
            await self.commands.resume_due()
        if self.retain is not None:
            purged = await self.backend.purge(self.clock() - self.retain)
            if purged:
                log.info("forgot %d request(s) ended over %gs ago", purged, self.retain)
        stats = await self.backend.stats(self.clock())
        for worker in stats.workers:
            if is_dead_local_worker(worker):
                released = await self.backend.release_worker(worker)
                log.warning("worker %s is gone; %d job(s) back on their queues", worker, released)

    async def run_until_idle(self, timeout: float = 30.0) -> None:
        """Apply reports until no request is active (for tests with in-process workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.step():
                continue
            stats = await self.backend.stats(self.clock())
            if not stats.requests.get("PENDING") and not stats.requests.get("RUNNING"):
                return
            await self.backend.wait_reports(0.05)
        raise TimeoutError("requests still active after run_until_idle timeout")


HOST = socket.gethostname()


def worker_id(service: str, pid: int | None = None) -> str:
    """``host:pid:service``: from it the engine can tell when a local worker has died."""
    return f"{HOST}:{pid or os.getpid()}:{service}"


def is_dead_local_worker(worker: str) -> bool:
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

"""The engine: accepts requests and applies workers' reports to them.

Its completion handler is load, advance, commit: it reads a batch of reports, runs each
through the pure state machine, and commits every request's step in one atomic unit
with the jobs that became ready. A commit that finds the request changed underneath it
(another engine got there first) is dropped and the reports are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from bach.core.effects import Dispatch, Withdraw
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
    Conflict,
    InvalidInput,
    MappingError,
    NotFound,
    TooLarge,
    UnreadableRecord,
)
from bach.runtime import metrics
from bach.runtime.codec import (
    Head,
    Held,
    Known,
    Plans,
    from_record,
    head_of,
    to_change,
    to_jobs,
    to_record,
)

log = logging.getLogger("bach.engine")

#: Reports applied in one step at most.
BATCH = 256
#: Tasks in a request beyond which its submission is worked out off the event loop.
LARGE = 200
#: Jobs in a request beyond which a step on it runs off the event loop.
HELD_JOBS = 5000
#: Characters to parse beyond which reading a request runs off the event loop.
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
    info = info_of(report)
    if not report.ok:
        return machine.JobFailed(
            report.task, report.attempt, report.payload, report.retryable, info
        )
    try:
        value = read_result(report.payload, limits)
    except BachError as exc:
        reason = f"{exc.field}: {exc.reason}"
        info["error"] = {"type": type(exc).__name__, "message": reason}
        return machine.JobFailed(report.task, report.attempt, reason, False, info)
    return machine.JobDone(report.task, report.attempt, value, info)


def info_of(report: Report) -> dict[str, Any]:
    """What the worker recorded of the attempt; {} from a worker that records nothing
    (or records something this version cannot read)."""
    try:
        info = json.loads(report.info) if report.info else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _refused(event: machine.Event, reason: str) -> machine.Event:
    if isinstance(event, machine.JobDone):
        info = {**event.info, "error": {"type": "TooLarge", "message": reason}}
        return machine.JobFailed(event.task, event.attempt, reason, False, info)
    return event


@dataclass(frozen=True)
class Unreadable:
    """A stored record that cannot be turned back into a request, and why."""

    record: RequestRecord
    reason: str


def _heads(
    records: Sequence[RequestRecord], plans: Mapping[str, Plan | str]
) -> list[Head | Unreadable]:
    found: list[Head | Unreadable] = []
    for record in records:
        plan = plans[record.plan_id]
        try:
            if isinstance(plan, str):
                raise LookupError(plan)
            found.append(head_of(record, plan))
        except Exception as exc:  # a record this version cannot read
            found.append(Unreadable(record, f"{type(exc).__name__}: {exc}"[:500]))
    return found


def _heavy(request: Request, batch: Sequence[Report]) -> bool:
    """Whether a step on these reports is worth a thread: it may dispatch hundreds of
    jobs (each rendered and written), or the request holds thousands (the new state
    copies and compares them: cheap each, about 30 ns)."""
    plan = request.plan
    tasks = (plan.by_name.get(r.task) for r in batch)
    dispatches = sum(len(plan.dependents[t.index]) for t in tasks if t is not None)
    return dispatches > LARGE or len(request.jobs) > HELD_JOBS


def _to_parse(record: RequestRecord) -> int:
    return len(record.body) + sum(map(len, (record.parts or {}).values()))


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
        metrics.declare(score.services)
        self.clock = clock
        self.plans = Plans(backend)
        #: The requests this engine stepped last, so that their next step reads only
        #: what changed since.
        self.held = Held()
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
        record, known = to_record(request)
        if known.size > self.limits.request:
            raise TooLarge(
                "input",
                f"the request would hold {size_text(known.size)} with its first tasks' "
                f"inputs; at most {size_text(self.limits.request)} is allowed "
                f"({option('request')})",
            )
        stored, created = await self.backend.create(
            record, plan.digest, json.dumps(plan.to_dict()), to_jobs(dispatches)
        )
        if not created:
            existing = (await self._known(stored)).request
            if existing.submitted is not None and existing.submitted != request.submitted:
                raise Conflict(
                    "key",
                    f"key {existing.key!r} is taken by request {existing.id}, submitted with "
                    "another body (rubric, client, todo or input); use a new key, or "
                    f"POST /api/requests/{existing.id}/retry to run that one again",
                )
            return existing, False
        self.held.put(known)
        metrics.request_submitted()
        log.info(
            "request %s accepted (%s, %d tasks)",
            request.id,
            plan.name,
            len(plan.tasks),
            extra={"request_id": request.id},
        )
        return request, True

    def _accept(self, sub: Submission, key: str | None) -> tuple[Request, Plan, list[Dispatch]]:
        """The new request and its first dispatches (pure: nothing is stored yet)."""
        text = encode_json(sub.input, "input", self.limits.input, "input", self.limits.depth)
        plan, client = self.plan_for(sub)
        submitted = hashlib.sha256(f"{plan.digest}\n{client}\n{text}".encode()).hexdigest()
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
            submitted=submitted[:32],
        )
        request, effects = machine.advance(request, machine.Started(), now)
        if request.status == machine.Status.FAILED:
            assert request.error is not None
            raise MappingError(f"input (task {request.error['task']})", request.error["message"])
        return request, plan, [e for e in effects if isinstance(e, Dispatch)]

    async def _known(self, record: RequestRecord, base: Known | None = None) -> Known:
        """The request a record (with its parts) holds."""
        if record.plan_id == COMMAND_PLAN:
            raise NotFound(
                "request", f"{record.id} is a command run: see /api/commands/{record.id}"
            )
        plan = await self.plans.get(record.plan_id)
        if _to_parse(record) > OFF_LOOP:
            return await asyncio.to_thread(from_record, record, plan, base)
        return from_record(record, plan, base)

    async def _load(self, ref: str) -> Known:
        record = await self.backend.load(ref)
        if record is None:
            raise NotFound("request", f"no request with id or key {ref!r}")
        try:
            return await self._known(record)
        except BachError:
            raise
        except Exception as exc:
            reason = f"the stored record of {record.id} cannot be read: {type(exc).__name__}"
            raise UnreadableRecord("record", f"{reason}: {exc}"[:500]) from exc

    async def get(self, ref: str) -> Request:
        return (await self._load(ref)).request

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
    ) -> tuple[list[Head | Unreadable], float | None]:
        """Newest first (headers: no input, no jobs), and where the next page starts
        (None: this is the last). A record that cannot be read is listed as Unreadable,
        not an error for the whole page."""
        records = await self.backend.list_requests(status, limit, before)
        wanted = [r for r in records if r.plan_id != COMMAND_PLAN]
        plans: dict[str, Plan | str] = {}
        for plan_id in {r.plan_id for r in wanted}:
            try:
                plans[plan_id] = await self.plans.get(plan_id)
            except Exception as exc:  # a plan this version cannot read, or none
                plans[plan_id] = f"{type(exc).__name__}: {exc}"
        if sum(len(r.body) for r in wanted) > OFF_LOOP:
            found = await asyncio.to_thread(_heads, wanted, plans)
        else:
            found = _heads(wanted, plans)
        more = records[-1].created_at if len(records) == limit else None
        return found, more

    async def cancel(self, ref: str) -> Request:
        """End a request that is running: its queued jobs are withdrawn and the workers
        holding its running ones stop them."""
        return await self._change(ref, machine.Cancelled())

    async def retry(self, ref: str) -> Request:
        """Run a FAILED or CANCELLED request again from the tasks that did not complete."""
        request = await self.get(ref)
        if request.status not in (machine.Status.FAILED, machine.Status.CANCELLED):
            raise Conflict(
                "status",
                f"request {request.id} is {request.status}; only a FAILED or CANCELLED "
                "request can be retried",
            )
        return await self._change(ref, machine.Retried())

    async def _change(self, ref: str, event: machine.Event) -> Request:
        """Apply a client's event to a request, however often another engine moves it."""
        for _ in range(100):
            known = await self._load(ref)
            new, step, after = self._apply(known, [event], self.clock(), ())
            if after is None:
                return new
            if (await self.backend.commit([step]))[0]:
                self.held.put(after)
                if new.terminal:
                    self._wake(new)
                self._log_change(known.request, new)
                return new
        raise RuntimeError(f"request {ref} kept changing while a client changed it")

    # -- applying reports ----------------------------------------------------------------

    async def step(self) -> int:
        """Apply one batch of reports. Returns how many reports were read."""
        reports, records = await self.backend.reports_with_requests(BATCH)
        if not reports:
            return 0
        grouped: dict[str, list[Report]] = defaultdict(list)
        for report in reports:
            grouped[report.request_id].append(report)
        known, moved = await self._current(records)
        for rid in moved:  # changed since its reports were read: read them again
            del grouped[rid]
        now = self.clock()
        steps: list[Transition] = []
        ended: dict[str, Request] = {}
        after: dict[str, Known] = {}
        outcomes: dict[str, list[tuple[str, Report]]] = {}
        for rid, batch in grouped.items():
            consumed = tuple(r.job_id for r in batch)
            record = records.get(rid)
            if record is not None and record.plan_id == COMMAND_PLAN:  # a command's call
                steps.append(apply_service_reports(record, batch, self.score, now, self.limits))
                continue
            base = known.get(rid)
            if base is None:  # a report for a request that is gone: drop it
                steps.append(Transition(rid, 0, None, consumed=consumed))
                continue
            plan = base.request.plan
            if _heavy(base.request, batch):
                new, step, changed = await asyncio.to_thread(
                    self._advance, base, batch, now, consumed
                )
            else:
                new, step, changed = self._advance(base, batch, now, consumed)
            tasks = plan.by_name
            outcomes[rid] = [(tasks[r.task].service, r) for r in batch if r.task in tasks]
            steps.append(step)
            if changed is not None:
                after[rid] = changed
            if new.terminal and not base.request.terminal:
                ended[rid] = new
        results = await self.backend.commit(steps)
        for (rid, batch), ok in zip(grouped.items(), results, strict=True):
            if ok:
                self._committed(rid, after.get(rid), ended.get(rid))
                self.applied += len(batch)
                self._log_step(rid, known.get(rid), after.get(rid), batch)
        self._measure(steps, results, outcomes)
        return len(reports)

    def _log_step(
        self, rid: str, before: Known | None, after: Known | None, batch: Sequence[Report]
    ) -> None:
        """One line per failed attempt and per request that ended, at INFO."""
        if before is None or after is None:
            return
        old, new = before.request, after.request
        for report in batch:
            job = new.jobs.get(report.task)
            if report.ok or job is None or old.jobs.get(report.task) is job:
                continue
            error = info_of(report).get("error") or {}
            retrying = job.status == machine.JobStatus.QUEUED
            if retrying:
                metrics.job_retried(new.plan.by_name[report.task].service)
            log.info(
                "request %s task %s attempt %d failed: %s",
                rid,
                report.task,
                report.attempt,
                report.payload.splitlines()[0][:500] if report.payload else "",
                extra={
                    "request_id": rid,
                    "task": report.task,
                    "attempt": report.attempt,
                    "error_type": error.get("type", "Error"),
                    "retrying": retrying,
                },
            )
        self._log_change(old, new)

    @staticmethod
    def _log_change(old: Request, new: Request) -> None:
        if new.terminal and not old.terminal:
            metrics.request_ended(new.status.value)
            message = (new.error or {}).get("message", "")
            log.info(
                "request %s %s%s",
                new.id,
                new.status,
                f": {str(message)[:500]}" if message else "",
                extra={"request_id": new.id, "status": new.status.value},
            )
        elif old.terminal and not new.terminal:
            log.info("request %s retried", new.id, extra={"request_id": new.id})

    def _committed(self, rid: str, after: Known | None, ended: Request | None) -> None:
        if after is not None:
            self.held.put(after)
        if ended is not None:
            self._wake(ended)
        elif self.commands is not None:
            self.commands.notify(rid)

    async def _current(
        self, heads: Mapping[str, RequestRecord]
    ) -> tuple[dict[str, Known], set[str]]:
        """The requests these headers belong to: as this engine holds them when it wrote
        the version the store has, else read with the parts written since it did. Also
        the requests another engine moved on between the two reads: their reports may be
        applied already, so they wait for the next step (applying them to the newer
        version would change nothing, but count them twice)."""
        found: dict[str, Known] = {}
        moved: set[str] = set()
        missing: list[str] = []
        since: dict[str, int] = {}
        for rid, head in heads.items():
            if head.plan_id == COMMAND_PLAN:
                continue
            held = self.held.get(rid)
            if held is not None and held.request.version == head.version:
                found[rid] = held
                continue
            missing.append(rid)
            if held is not None and not held.whole:
                since[rid] = held.request.version
        if missing:
            for rid, record in (await self.backend.load_many(missing, since)).items():
                known = await self._known(record, self.held.get(rid) if rid in since else None)
                if record.version == heads[rid].version:
                    found[rid] = known
                else:
                    moved.add(rid)
                    self.held.put(known)  # so the next step needs only the header
        return found, moved

    def _measure(
        self,
        steps: Sequence[Transition],
        results: Sequence[bool],
        outcomes: Mapping[str, list[tuple[str, Report]]],
    ) -> None:
        """Service times and job counts from the reports of the steps that were
        committed (deliveries the store found lost are counted with the report of the
        attempt that came after them)."""
        for step, ok in zip(steps, results, strict=True):
            if not ok:
                continue
            for service, report in outcomes.get(step.request_id, ()):
                for _ in info_of(report).get("lost") or ():
                    metrics.job_finished(service, "lost", None)
                    metrics.job_retried(service)
                metrics.job_finished(
                    service, "ok" if report.ok else "failed", report.elapsed or None
                )
                if report.elapsed > 0:
                    old = self.service_time.get(service)
                    self.service_time[service] = (
                        report.elapsed
                        if old is None
                        else old + SERVICE_TIME_WEIGHT * (report.elapsed - old)
                    )

    def _advance(
        self,
        base: Known,
        batch: Sequence[Report],
        now: float,
        consumed: tuple[str, ...],
    ) -> tuple[Request, Transition, Known | None]:
        """A request's reports applied: the request after, the transition to commit and
        the request as the store will hold it (pure work: it may run in a thread)."""
        events = [event_of(report, self.limits) for report in batch]
        new, step, after = self._apply(base, events, now, consumed)
        if after is not None and after.size > self.limits.request:
            # The results would make the request too large to keep: they fail instead.
            reason = (
                f"the request would hold {size_text(after.size)} of inputs and "
                f"results; at most {size_text(self.limits.request)} is allowed "
                f"({option('request')})"
            )
            events = [_refused(event, reason) for event in events]
            new, step, after = self._apply(base, events, now, consumed)
        return new, step, after

    @staticmethod
    def _apply(
        base: Known,
        events: Sequence[machine.Event],
        now: float,
        consumed: tuple[str, ...],
    ) -> tuple[Request, Transition, Known | None]:
        old = base.request
        new, effects = old, []
        for event in events:
            new, more = machine.advance(new, event, now)
            effects += more
        if new is old:
            return old, Transition(old.id, old.version, None, consumed=consumed), None
        new = replace(new, version=old.version + 1)
        record, after = to_change(base, new)
        step = Transition(
            old.id,
            old.version,
            record,
            to_jobs([e for e in effects if isinstance(e, Dispatch)]),
            consumed,
            withdraw=any(isinstance(e, Withdraw) for e in effects),
        )
        return new, step, after

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
        now = self.clock()
        stats = await self.backend.stats(now)
        for worker in stats.workers:
            if is_dead_local_worker(worker):
                released = await self.backend.release_worker(worker)
                log.warning("worker %s is gone; %d job(s) back on their queues", worker, released)
        for worker in await self.backend.present_workers(now):
            if is_dead_local_worker(worker):  # no need to wait for its presence to lapse
                await self.backend.present(worker, "", 0.0, now)

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

"""Running commands durably: checkpoints, resume after a crash, service calls.

A run is owned by one engine at a time (``owner``, with a lease it pushes out while it
lives). The owner executes the run's top-level commands in order; each child call made
through ``context.execute`` is looked up by its key (alias, else command name) in the
parent's stored children: a COMPLETE child returns its stored response, a FAILED one
raises its stored error, anything else runs. A child's end is one durable commit of
the run's tree, so a crash loses at most the children that were running.

When the owner dies (its process is gone from this host, or its lease ran out), any
engine claims the run and executes it again from the top; completed children come
from the store. A call to a score service is a job on that service's queue, committed
with the run's tree; whichever engine reads the worker's report applies it to the tree
(``apply_service_reports``) and the owner picks the response up from there.

A client cancels a run with one commit of its record (``cancel``), through any engine:
its status becomes CANCELLED and its service jobs are withdrawn. The owner learns it at
once when the cancel came through its own engine, else at its next read or write of the
run (before each child call it starts, after each that ends, every half second while a
service call runs, at its lease's heartbeat), and stops: no child call starts after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bach.backends.port import Backend, JobRecord, Report, RequestRecord, Transition
from bach.commands import CommandFailed, DuplicateAlias, command_name, is_command
from bach.commands.state import ENDED, PLAN_ID, Node, Run, Status, error_of
from bach.core.limits import DEFAULTS, Limits, check_key, encode_json, option, read_result
from bach.core.score import Score
from bach.errors import BachError, Conflict, InvalidInput, NotFound

log = logging.getLogger("bach.commands")

#: Seconds an owner's claim on a run lasts without being pushed out.
LEASE = 30.0
CANCELLED_ERROR = {"type": "Cancelled", "message": "the run was cancelled by a client"}
#: The error of a call that had started and not ended when its run was cancelled.
_CUT_SHORT = {"type": "Cancelled", "message": "the run was cancelled before this call ended"}
#: Records one listing of runs reads at most (requests are in the same listing).
LIST_SCAN = 10_000
_PAGE = 500


class CommandDiverged(BachError):
    """A stored child's command differs from the one the code now calls by that key."""

    status = 409


class RunLost(Exception):
    """Another engine has claimed this run: stop executing it here."""


class RunCancelled(RunLost):
    """A client has cancelled this run: stop executing it."""


class Registry:
    """Commands by name, from plugins."""

    def __init__(self) -> None:
        self.commands: dict[str, type] = {}
        self.sources: dict[str, str] = {}

    def add(self, cls: type, source: str) -> None:
        if not is_command(cls):
            raise InvalidInput("command", f"{cls!r} from {source} has no execute method")
        name = command_name(cls)
        if name in self.commands and self.commands[name] is not cls:
            raise InvalidInput(
                "command", f"{name!r} from {source} is already defined by {self.sources[name]}"
            )
        self.commands[name] = cls
        self.sources[name] = source

    def get(self, name: str) -> type:
        if name not in self.commands:
            known = ", ".join(sorted(self.commands)) or "none"
            raise NotFound("command", f"unknown command {name!r} (known: {known})")
        return self.commands[name]


def _jsonable(value: Any, what: str, limits: Limits, limit: str) -> Any:
    """The value as it will read back from the store (tuples become lists, and so on);
    InvalidInput or TooLarge if it is not JSON Bach can keep (NaN, too deep, too large:
    ``limit`` names the size limit, input or result)."""
    return json.loads(encode_json(value, what, getattr(limits, limit), limit, limits.depth))


def _record(run: Run, version: int, created_at: float, now: float) -> RequestRecord:
    return RequestRecord(
        run.id,
        run.key,
        run.status.value,
        version,
        PLAN_ID,
        json.dumps(run.to_body()),
        created_at,
        now,
    )


def load_run(record: RequestRecord) -> Run:
    return Run.from_body(record.id, record.key, record.status, json.loads(record.body))


def summary_of(record: RequestRecord) -> dict[str, Any]:
    """A run in a listing: what it runs and how it stands, without its tree."""
    out: dict[str, Any] = {
        "id": record.id,
        "key": record.key,
        "status": record.status,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
    try:
        run = load_run(record)
    except Exception as exc:  # a record this version cannot read: say so, list the rest
        out["unreadable"] = f"{type(exc).__name__}: {exc}"[:500]
        return out
    out["commands"] = {name: node.command for name, node in run.root.children.items()}
    out["error"] = run.error
    return out


def _cut_short(node: Node) -> None:
    """Mark the calls under ``node`` that had started and not ended as cancelled."""
    for child in node.children.values():
        if child.status in (Status.PENDING, Status.RUNNING):
            child.status, child.error = Status.FAILED, dict(_CUT_SHORT)
        _cut_short(child)


def _service_job(
    run_id: str, node: Node, path: str, score: Score, available_at: float
) -> JobRecord:
    assert node.service is not None
    spec = score.services[node.service].spec
    return JobRecord(
        f"{run_id}/{path}/{node.attempts}",
        run_id,
        path,
        node.attempts,
        node.service,
        json.dumps(node.request),
        available_at,
        spec.timeout,
    )


def apply_service_reports(
    record: RequestRecord,
    reports: Sequence[Report],
    score: Score,
    now: float,
    limits: Limits = DEFAULTS,
) -> Transition:
    """Apply workers' reports on a run's service calls to its stored tree (engine side)."""
    if record.status == Status.CANCELLED:  # reports of withdrawn jobs: nothing to apply
        return Transition(
            record.id, record.version, None, consumed=tuple(r.job_id for r in reports)
        )
    run = load_run(record)
    enqueue: list[JobRecord] = []
    changed = False
    for report in reports:
        node = run.root.find(report.task.split("/"))
        if node is None or node.service is None or node.ended or node.job != report.job_id:
            continue  # stale: a duplicate, or an attempt already superseded
        changed = True
        retryable, message = report.retryable, report.payload
        if report.ok:
            try:
                response = read_result(report.payload, limits)
            except BachError as exc:  # not JSON Bach can keep: no retry will change that
                retryable, message = False, f"{exc.field}: {exc.reason}"
            else:
                node.status, node.response, node.error = Status.COMPLETE, response, None
                continue
        node.error = {"type": "ServiceError", "message": message}
        service = score.services.get(node.service)
        spec = service.spec if service is not None else None
        if spec is not None and retryable and node.attempts <= spec.retries:
            delay = min(spec.max_backoff, spec.backoff * 2 ** (node.attempts - 1))
            node.attempts += 1
            job = _service_job(run.id, node, report.task, score, now + delay)
            node.job, node.status = job.id, Status.PENDING
            enqueue.append(job)
        else:
            node.status = Status.FAILED
    consumed = tuple(r.job_id for r in reports)
    if not changed:
        return Transition(record.id, record.version, None, consumed=consumed)
    new = _record(run, record.version + 1, record.created_at, now)
    return Transition(record.id, record.version, new, tuple(enqueue), consumed)


@dataclass
class _Live:
    """A run this engine executes: the owner's copy of the tree."""

    run: Run
    version: int
    created_at: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: A client cancelled the run: no child call starts, nothing more is saved.
    cancelled: bool = False


class _Context:
    def __init__(self, runner: CommandRunner, live: _Live, node: Node, path: list[str]) -> None:
        self._runner, self._live, self._node, self._path = runner, live, node, path
        self._used: set[str] = set()

    @property
    def run_id(self) -> str:
        return self._live.run.id

    @property
    def name(self) -> str:
        return self._node.name

    def _call(self, command: Any, request: Any, alias: str | None) -> Any:
        return self._runner.call(
            self._live, self._node, self._path, command, request, alias, self._used
        )


class SyncContext(_Context):
    """What a (sync) command's ``execute`` gets: ``context.execute(...)`` blocks."""

    def __init__(self, *args: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(*args)
        self._loop = loop

    def execute(self, command: Any, request: Any = None, alias: str | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(self._call(command, request, alias), self._loop)
        return future.result()


class AsyncContext(_Context):
    """What an ``async def execute`` gets: ``await context.execute(...)``."""

    async def execute(self, command: Any, request: Any = None, alias: str | None = None) -> Any:
        return await self._call(command, request, alias)


class CommandRunner:
    def __init__(
        self,
        backend: Backend,
        score: Score,
        registry: Registry,
        owner: str,
        clock: Callable[[], float] = time.time,
        is_dead: Callable[[str], bool] = lambda owner: False,
        limits: Limits = DEFAULTS,
    ) -> None:
        self.backend = backend
        self.score = score
        self.registry = registry
        self.owner = owner
        self.clock = clock
        self.is_dead = is_dead
        #: What a run may hold (bach serve's --max-* options).
        self.limits = limits
        self._live: dict[str, _Live] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="bach-command")
        self._closing = False
        self._last_scan = -LEASE

    # -- the API side --------------------------------------------------------------------

    def _names(self, items: Sequence[dict[str, Any]]) -> list[tuple[str, str, Any]]:
        if not items:
            raise InvalidInput("commands", "give at least one command to run")
        out: list[tuple[str, str, Any]] = []
        for i, item in enumerate(items):
            name = item["command"]
            self.registry.get(name)
            alias = item.get("name") or name
            self._check_alias(alias, f"commands[{i}].name")
            if alias in {seen for seen, _, _ in out}:
                raise InvalidInput(
                    f"commands[{i}].name",
                    f"{alias!r} is used twice; give repeated commands their own 'name'",
                )
            request = _jsonable(item.get("request"), f"commands[{i}].request", self.limits, "input")
            out.append((alias, name, request))
        return out

    async def submit(
        self, items: Sequence[dict[str, Any]], key: str | int | None = None
    ) -> tuple[Run, bool]:
        """Store a new run and start it; the same key again returns the first run. Returns
        the run and whether it is new."""
        key = None if key is None else check_key(key, self.limits.key)
        if len(items) > self.limits.tasks:
            raise InvalidInput(
                "commands",
                f"{len(items)} commands; at most {self.limits.tasks} are allowed in one run "
                f"({option('tasks')})",
            )
        calls = self._names(items)
        rid = str(uuid.uuid4())
        now = self.clock()
        root = Node(command="", name="", request=None, status=Status.RUNNING)
        for alias, name, request in calls:
            root.children[alias] = Node(command=name, name=alias, request=request)
        run = Run(rid, key or rid, root, owner=self.owner, lease_until=now + LEASE)
        record = _record(run, 0, now, now)
        stored, created = await self.backend.create(record, PLAN_ID, "{}", [])
        if not created:
            if stored.plan_id != PLAN_ID:
                raise Conflict("key", f"{key!r} is the key of a request, not a command run")
            return await self.get(stored.id), False
        self._start(_Live(run, 0, now))
        return run, True

    async def get(self, ref: str) -> Run:
        record = await self.backend.load(ref)
        if record is None or record.plan_id != PLAN_ID:
            raise NotFound("command", f"no command run with id or key {ref!r}")
        live = self._live.get(record.id)
        return live.run if live is not None else load_run(record)

    async def list_runs(
        self, status: str | None = None, limit: int = 100, before: float | None = None
    ) -> tuple[list[dict[str, Any]], float | None]:
        """Runs newest first, as summaries, and the ``before`` of the next page (None:
        this is the last). Runs share the store's listing with requests: one call reads
        at most ``LIST_SCAN`` records, and gives where it stopped as the next page."""
        found: list[dict[str, Any]] = []
        read = 0
        while True:
            records = await self.backend.list_requests(status, _PAGE, before)
            for record in records:
                if record.plan_id == PLAN_ID:
                    found.append(summary_of(record))
                    if len(found) == limit:
                        return found, record.created_at
            read += len(records)
            if len(records) < _PAGE:
                return found, None
            before = records[-1].created_at
            if read >= LIST_SCAN:
                return found, before

    async def cancel(self, ref: str) -> Run:
        """End a run that has not ended: CANCELLED in the store, its service jobs
        withdrawn (a worker running one stops it), the calls that were running marked
        as cut short. Its owner, this engine or another, starts no child call after;
        a sync command's thread that is running cannot be stopped, but whatever it
        does next through its context fails, and what it returns is not kept."""
        for _ in range(100):
            record = await self.backend.load(ref)
            if record is None or record.plan_id != PLAN_ID:
                raise NotFound("command", f"no command run with id or key {ref!r}")
            if record.status in ENDED:
                raise Conflict(
                    "status", f"command run {record.id} has already ended ({record.status})"
                )
            run = load_run(record)
            live = self._live.get(record.id)
            if live is not None:  # the owner's copy knows which calls are running
                live.cancelled = True
                live.run.merge_ended_from(run)
                run.root = Node.from_dict(live.run.root.to_dict())  # kept if this fails
            run.status, run.error = Status.CANCELLED, dict(CANCELLED_ERROR)
            _cut_short(run.root)
            new = _record(run, record.version + 1, record.created_at, self.clock())
            step = Transition(record.id, record.version, new, withdraw=True)
            try:
                ok = (await self.backend.commit([step]))[0]
            except BaseException:
                if live is not None:  # not cancelled: the owner carries on
                    live.cancelled = False
                raise
            if ok:
                log.info(
                    "command run %s CANCELLED",
                    run.id,
                    extra={"request_id": run.id, "status": run.status.value},
                )
                if live is not None:
                    live.run.root, live.run.status, live.run.error = run.root, run.status, run.error
                    if live.task is not None:
                        live.task.cancel()
                return run
        raise RuntimeError(f"command run {ref} kept changing while it was being cancelled")

    async def wait(self, ref: str, timeout: float) -> Run:
        deadline = time.monotonic() + timeout
        run = await self.get(ref)
        while not run.ended and (left := deadline - time.monotonic()) > 0:
            live = self._live.get(run.id)
            with contextlib.suppress(TimeoutError):
                if live is not None:
                    await asyncio.wait_for(live.done.wait(), min(left, 0.5))
                else:
                    await asyncio.sleep(min(left, 0.2))
            run = await self.get(run.id)
        return run

    # -- ownership -----------------------------------------------------------------------

    async def resume_due(self) -> int:
        """``resume`` at start, then every third of a lease: it reads every active record,
        and an owner elsewhere is only orphaned once its lease has run out anyway."""
        if time.monotonic() - self._last_scan < LEASE / 3:
            return 0
        self._last_scan = time.monotonic()
        return await self.resume()

    async def resume(self) -> int:
        """Claim runs whose owner is gone and execute them again from the top."""
        if self._closing:
            return 0
        claimed = 0
        now = self.clock()
        for status in (Status.PENDING, Status.RUNNING):
            for record in await self.backend.list_requests(status.value, limit=1000):
                if record.plan_id != PLAN_ID or record.id in self._live:
                    continue
                run = load_run(record)
                orphaned = run.owner is None or run.lease_until < now or self.is_dead(run.owner)
                if not orphaned:
                    continue
                previous = run.owner
                run.owner, run.lease_until = self.owner, now + LEASE
                new = _record(run, record.version + 1, record.created_at, now)
                if (await self.backend.commit([Transition(run.id, record.version, new)]))[0]:
                    log.info("resuming command run %s (was %s's)", run.id, previous)
                    self._start(_Live(run, record.version + 1, record.created_at))
                    claimed += 1
        return claimed

    async def heartbeat_due(self) -> None:
        """Push out the leases of the runs this engine executes, a third of a lease
        before they would run out."""
        now = self.clock()
        for live in list(self._live.values()):
            if live.run.lease_until - now > LEASE * 2 / 3:
                continue
            live.run.lease_until = self.clock() + LEASE
            try:
                await self._save(live)
            except RunCancelled:  # through another engine: stop what it still runs
                if live.task is not None:
                    live.task.cancel()
            except RunLost:
                pass

    def notify(self, run_id: str) -> None:
        """An engine applied a service result to this run: let its owner look."""
        live = self._live.get(run_id)
        if live is not None:
            live.changed.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop: runs still executing stay RUNNING in the store and resume elsewhere."""
        self._closing = True
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- execution -----------------------------------------------------------------------

    def _start(self, live: _Live) -> None:
        self._live[live.run.id] = live
        live.task = asyncio.create_task(self._execute(live), name=f"command {live.run.id}")

    async def _execute(self, live: _Live) -> None:
        run = live.run
        try:
            # Stored as RUNNING with its first checkpoint: one commit fewer per run.
            run.status = Status.RUNNING
            used: set[str] = set()
            for name, node in list(run.root.children.items()):
                try:
                    await self.call(live, run.root, [], node.command, node.request, name, used)
                except CommandFailed as exc:
                    run.status, run.error = Status.FAILED, exc.error
                    break
            else:
                run.status = Status.COMPLETE
            await self._save(live)
        except RunCancelled:
            log.info("command run %s was cancelled; stopped executing it", run.id)
        except RunLost:
            log.warning("command run %s was claimed by another engine; leaving it", run.id)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("command run %s: could not store its state; it will resume", run.id)
        finally:
            self._live.pop(run.id, None)
            live.done.set()

    def _check_alias(self, alias: str, field: str) -> None:
        if not alias or "/" in alias:
            raise DuplicateAlias(field, f"{alias!r}: a name must be non-empty, without '/'")

    async def call(
        self,
        live: _Live,
        parent: Node,
        path: list[str],
        command: Any,
        request: Any,
        alias: str | None,
        used: set[str],
    ) -> Any:
        """One checkpointed child call of ``parent``."""
        if self._closing:  # a sync command's thread outlived its runner
            raise RunLost(live.run.id)
        if is_command(command):
            target, cls, service = command_name(command), command, None
        elif isinstance(command, str) and command in self.registry.commands:
            target, cls, service = command, self.registry.commands[command], None
        elif isinstance(command, str) and command in self.score.services:
            target, cls, service = command, None, command
        else:
            known = sorted([*self.registry.commands, *self.score.services])
            raise NotFound(
                "command", f"{command!r} is neither a command nor a service (known: {known})"
            )
        name = alias or target
        self._check_alias(name, "alias")
        where = "/".join(path) or "the run"
        if name in used:
            raise DuplicateAlias(
                "alias",
                f"{name!r} is called twice in one execution of {where}: each call is "
                "checkpointed by its key, so repeated calls need their own alias "
                "(context.execute(..., alias='step-1'))",
            )
        used.add(name)
        node = parent.children.get(name)
        if node is not None and node.command != target:
            raise CommandDiverged(
                "alias",
                f"{name!r} in {where} was a call of {node.command} when this run began, "
                f"and is now a call of {target}",
            )
        if node is None:
            request = _jsonable(request, f"request of {name!r}", self.limits, "input")
            node = Node(command=target, name=name, request=request, service=service)
            parent.children[name] = node
        if node.status == Status.COMPLETE:
            return node.response
        if node.status == Status.FAILED:
            assert node.error is not None
            raise CommandFailed(name, node.error)
        # About to run (or wait for) a call: not for a run cancelled since, here or
        # through another engine.
        if live.cancelled:
            raise RunCancelled(live.run.id)
        await self._refresh(live)
        if service is not None:
            return await self._call_service(live, node, "/".join([*path, name]))
        assert cls is not None
        return await self._run_command(live, node, [*path, name], cls)

    async def _run_command(self, live: _Live, node: Node, path: list[str], cls: type) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            node.status, node.attempts = Status.RUNNING, node.attempts + 1
            retryable = True
            try:
                instance = cls()
                if inspect.iscoroutinefunction(cls.execute):  # type: ignore[attr-defined]
                    response = await instance.execute(
                        AsyncContext(self, live, node, path), node.request
                    )
                else:
                    context = SyncContext(self, live, node, path, loop=loop)
                    response = await loop.run_in_executor(
                        self._pool, instance.execute, context, node.request
                    )
                response = _jsonable(response, f"response of {node.name!r}", self.limits, "result")
            except (RunLost, asyncio.CancelledError):
                raise

            except Exception as exc:
                # A bug in the command's own code is not worth a retry.
                retryable = not isinstance(exc, (InvalidInput, DuplicateAlias, CommandDiverged))
                node.error = error_of(exc)
                if retryable and node.attempts <= getattr(cls, "retries", 0):
                    node.status = Status.PENDING
                    await self._save(live)
                    await asyncio.sleep(getattr(cls, "backoff", 1.0) * 2 ** (node.attempts - 1))
                    continue
                node.status = Status.FAILED
                await self._save(live)
                raise CommandFailed(node.name, node.error) from None
            node.status, node.response, node.error = Status.COMPLETE, response, None
            await self._save(live)
            return response

    async def _call_service(self, live: _Live, node: Node, path: str) -> Any:
        if node.job is None:
            node.attempts += 1
            job = _service_job(live.run.id, node, path, self.score, self.clock())
            node.job, node.status = job.id, Status.RUNNING
            await self._save(live, (job,))
        while not node.ended:
            live.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.changed.wait(), 0.5)
            await self._refresh(live)
        if node.status == Status.FAILED:
            assert node.error is not None
            raise CommandFailed(node.name, node.error)
        return node.response

    async def _refresh(self, live: _Live) -> None:
        """Take what other engines wrote (service results) into the owner's copy."""
        record = await self.backend.load(live.run.id)
        if record is None:
            raise RunLost(live.run.id)
        if record.status == Status.CANCELLED:
            live.cancelled = True
            raise RunCancelled(live.run.id)
        stored = load_run(record)
        if stored.owner != self.owner:
            raise RunLost(live.run.id)
        if record.version != live.version:
            live.run.merge_ended_from(stored)
            live.version = record.version

    async def _save(self, live: _Live, enqueue: tuple[JobRecord, ...] = ()) -> None:
        if live.cancelled:
            raise RunCancelled(live.run.id)
        if self._closing:
            raise RunLost(live.run.id)
        async with live.lock:
            for _ in range(100):
                now = self.clock()
                record = _record(live.run, live.version + 1, live.created_at, now)
                step = Transition(live.run.id, live.version, record, enqueue)
                if (await self.backend.commit([step]))[0]:
                    live.version += 1
                    return
                await self._refresh(live)
            raise RuntimeError(f"command run {live.run.id} kept changing while being saved")

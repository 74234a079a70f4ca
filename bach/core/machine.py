"""The request state machine: ``advance(request, event, now) -> (request, effects)``.

Pure: no I/O, no clock (``now`` is an argument), no randomness. An event that does not
apply (a duplicate report, a stale attempt, anything after the request ended) returns the
very same request object and no effects, so callers can tell "nothing changed" by
identity. That is what makes delivery at-least-once but application exactly-once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from bach.core.effects import Dispatch, Effect, Fail, Finish, Withdraw
from bach.core.rubric import Plan, Task
from bach.errors import MappingError


class Status(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({Status.COMPLETE, Status.FAILED, Status.CANCELLED})


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


_OPEN_JOB = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


#: An attempt on record: ``attempt`` (the dispatch it ran under), ``outcome`` (ok,
#: failed, lost, cancelled), ``round`` (0, then one more per retry of the request), and
#: what the worker said: ``worker``, ``started_at``, ``ended_at``, ``error`` (``type``,
#: ``message``, ``traceback``, ``stderr``) or, for a lost one, ``reason``.
Attempt = Mapping[str, Any]


@dataclass(frozen=True)
class Job:
    """One task of one request: its latest attempt and, once done, its result."""

    task: str
    service: str
    status: JobStatus
    #: The number of the current dispatch (it names the job on its queue).
    attempts: int
    input: Any
    result: Any = None
    error: str | None = None
    queued_at: float = 0.0
    finished_at: float | None = None
    #: Every attempt that ended, lost ones included, oldest first.
    history: tuple[Attempt, ...] = ()

    def tries(self, round_: int) -> int:
        """Attempts made in this round of the request, lost ones included."""
        return sum(1 for a in self.history if a.get("round", 0) == round_)

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "status": self.status.value,
            "attempts": self.attempts,
            "input": self.input,
            "result": self.result,
            "error": self.error,
            "queued_at": self.queued_at,
            "finished_at": self.finished_at,
            "history": [dict(a) for a in self.history],
        }

    @classmethod
    def from_dict(cls, task: str, data: Mapping[str, Any]) -> Job:
        return cls(
            task=task,
            service=data["service"],
            status=JobStatus(data["status"]),
            attempts=data["attempts"],
            input=data["input"],
            result=data.get("result"),
            error=data.get("error"),
            queued_at=data.get("queued_at", 0.0),
            finished_at=data.get("finished_at"),
            history=tuple(data.get("history", ())),
        )


@dataclass(frozen=True)
class Request:
    """One run of a plan on one input."""

    id: str
    key: str
    plan: Plan
    input: Any
    created_at: float
    status: Status = Status.PENDING
    done: int = 0
    dispatched: int = 0
    jobs: Mapping[str, Job] = field(default_factory=dict)
    result: Any = None
    error: Mapping[str, Any] | None = None
    updated_at: float = 0.0
    client: str | None = None
    version: int = 0
    #: A digest of what was submitted: the same key with another body is a conflict.
    submitted: str | None = None
    #: Retries of the whole request so far (each restarts its failed tasks).
    round: int = 0
    #: What happened to the request beyond its jobs: ``{"at", "event", ...}``.
    trace: tuple[Mapping[str, Any], ...] = ()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def remaining(self) -> int:
        """How many tasks are still to run (not done, not in flight)."""
        return (self.plan.full & ~(self.done | self.dispatched)).bit_count()

    def to_dict(self) -> dict[str, Any]:
        """The mutable state; the plan is stored beside it, by digest."""
        return {
            "id": self.id,
            "key": self.key,
            "input": self.input,
            "status": self.status.value,
            "done": self.done,
            "dispatched": self.dispatched,
            "jobs": {name: job.to_dict() for name, job in self.jobs.items()},
            "result": self.result,
            "error": dict(self.error) if self.error is not None else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "client": self.client,
            "version": self.version,
            "submitted": self.submitted,
            "round": self.round,
            "trace": [dict(t) for t in self.trace],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], plan: Plan) -> Request:
        return cls(
            id=data["id"],
            key=data["key"],
            plan=plan,
            input=data["input"],
            created_at=data["created_at"],
            status=Status(data["status"]),
            done=data["done"],
            dispatched=data["dispatched"],
            jobs={name: Job.from_dict(name, job) for name, job in data["jobs"].items()},
            result=data.get("result"),
            error=data.get("error"),
            updated_at=data.get("updated_at", 0.0),
            client=data.get("client"),
            version=data.get("version", 0),
            submitted=data.get("submitted"),
            round=data.get("round", 0),
            trace=tuple(data.get("trace", ())),
        )


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request was accepted: dispatch what can run first."""


@dataclass(frozen=True)
class JobDone:
    task: str
    attempt: int
    result: Any
    #: What the worker recorded of the attempt (``Attempt`` fields) and of earlier
    #: deliveries of it that were lost (``lost``: ``worker``, ``reason``, ``at``).
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    task: str
    attempt: int
    error: str
    #: False for failures that another attempt cannot fix.
    retryable: bool = True
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cancelled:
    reason: str = "cancelled by a client"


@dataclass(frozen=True)
class Retried:
    """Run a FAILED or CANCELLED request again from the tasks that did not complete,
    keeping the results of those that did."""

    reason: str = "retried by a client"


Event = Started | JobDone | JobFailed | Cancelled | Retried


def advance(request: Request, event: Event, now: float) -> tuple[Request, list[Effect]]:
    """Apply one event. Returns the new request and what must happen because of it."""
    if isinstance(event, Retried):
        return _retried(request, event, now)
    if request.terminal:
        return request, []
    if isinstance(event, Started):
        if request.jobs:
            return request, []
        ready = request.plan.ready(request.done, request.dispatched)
        return _dispatch(request, dict(request.jobs), ready, now)
    if isinstance(event, Cancelled):
        jobs = {
            name: replace(job, status=JobStatus.CANCELLED) if job.status in _OPEN_JOB else job
            for name, job in request.jobs.items()
        }
        error = {"task": None, "message": event.reason}
        ended = replace(
            request, status=Status.CANCELLED, jobs=jobs, error=error, dispatched=0, updated_at=now
        )
        return ended, [Withdraw(request.id)]
    job = request.jobs.get(event.task)
    if job is None or job.attempts != event.attempt or job.status not in _OPEN_JOB:
        return request, []
    if isinstance(event, JobDone):
        return _job_done(request, job, event, now)
    return _job_failed(request, job, event, now)


def _attempts(
    request: Request, job: Job, event: JobDone | JobFailed, outcome: str, now: float
) -> tuple[Attempt, ...]:
    """The job's history with the event's attempt (and the lost deliveries before it)."""
    info = dict(event.info)
    lost = info.pop("lost", ())
    base = {"attempt": job.attempts, "round": request.round}
    added = [
        {**base, "outcome": "lost", **{k: v for k, v in entry.items() if k != "round"}}
        for entry in lost
    ]
    added.append({**base, "outcome": outcome, "ended_at": now, **info})
    return (*job.history, *added)


def _job_done(
    request: Request, job: Job, event: JobDone, now: float
) -> tuple[Request, list[Effect]]:
    plan = request.plan
    task = plan.by_name[job.task]
    jobs = dict(request.jobs)
    jobs[job.task] = replace(
        job,
        status=JobStatus.COMPLETE,
        result=event.result,
        error=None,
        finished_at=now,
        history=_attempts(request, job, event, "ok", now),
    )
    done = request.done | task.value
    dispatched = request.dispatched & ~task.value
    request = replace(
        request,
        jobs=jobs,
        done=done,
        dispatched=dispatched,
        status=Status.RUNNING,
        updated_at=now,
    )
    if done == plan.full:
        try:
            value = _result(request)
        except MappingError as exc:
            return _fail(request, None, f"result: {exc.reason}", now)
        return replace(request, status=Status.COMPLETE, result=value), [Finish(request.id, value)]
    # Everything that was ready is done or dispatched, so only this task's dependents
    # can have become ready: a step costs what it changes, not the size of the plan.
    return _dispatch(request, jobs, plan.ready_after(task, done, dispatched), now)


def _job_failed(
    request: Request, job: Job, event: JobFailed, now: float
) -> tuple[Request, list[Effect]]:
    task = request.plan.by_name[job.task]
    jobs = dict(request.jobs)
    history = _attempts(request, job, event, "failed", now)
    job = replace(job, history=history)
    tried = job.tries(request.round)
    if event.retryable and tried <= task.retries:
        delay = backoff(task, tried, f"{request.id}/{task.name}/{job.attempts}")
        retry = replace(
            job,
            status=JobStatus.QUEUED,
            attempts=job.attempts + 1,
            error=event.error,
            queued_at=now,
        )
        jobs[job.task] = retry
        dispatch = Dispatch(
            request.id,
            task.name,
            retry.attempts,
            task.service,
            job.input,
            now + delay,
            task.timeout,
        )
        return replace(request, jobs=jobs, status=Status.RUNNING, updated_at=now), [dispatch]
    jobs[job.task] = replace(job, status=JobStatus.FAILED, error=event.error, finished_at=now)
    tries = f"{tried} attempt{'s' if tried > 1 else ''}"
    request = replace(request, jobs=jobs)
    return _fail(request, task.name, f"task {task.name!r} failed after {tries}: {event.error}", now)


def backoff(task: Task, failures: int, seed: str) -> float:
    """Seconds before the next attempt after ``failures`` failed ones: ``backoff`` times
    ``backoff_factor`` per failure after the first, at most ``max_backoff``, less up to
    ``jitter`` of it by a hash of ``seed`` (pure: the same job always waits the same)."""
    delay = min(task.max_backoff, task.backoff * task.backoff_factor ** (failures - 1))
    if task.jitter:
        share = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64
        delay *= 1 - task.jitter * share
    return delay


def _retried(request: Request, event: Retried, now: float) -> tuple[Request, list[Effect]]:
    if request.status not in (Status.FAILED, Status.CANCELLED):
        return request, []
    plan = request.plan
    jobs = dict(request.jobs)
    ready = plan.ready(request.done, 0)
    effects: list[Effect] = []
    dispatched = 0
    again = replace(request, round=request.round + 1)
    if request.done == plan.full:  # every task is done: only the result failed
        try:
            value = _result(again)
        except MappingError as exc:
            return _fail(again, None, f"result: {exc.reason}", now)
        return replace(again, status=Status.COMPLETE, result=value, error=None), [
            Finish(request.id, value)
        ]
    for task in ready:
        try:
            value = task_input(again, task)
        except MappingError as exc:
            return _fail(again, task.name, f"task {task.name!r}: {exc}", now)
        old = jobs.get(task.name)
        attempt = old.attempts + 1 if old is not None else 1
        history = old.history if old is not None else ()
        jobs[task.name] = Job(
            task.name,
            task.service,
            JobStatus.QUEUED,
            attempt,
            value,
            queued_at=now,
            history=history,
        )
        dispatched |= task.value
        effects.append(
            Dispatch(request.id, task.name, attempt, task.service, value, now, task.timeout)
        )
    entry = {
        "at": now,
        "event": "retried",
        "from": request.status.value,
        "reason": event.reason,
        "tasks": [t.name for t in ready],
    }
    retried = replace(
        again,
        status=Status.RUNNING,
        jobs=jobs,
        dispatched=dispatched,
        error=None,
        result=None,
        updated_at=now,
        trace=(*request.trace, entry),
    )
    return retried, effects


def _fail(
    request: Request, task: str | None, message: str, now: float
) -> tuple[Request, list[Effect]]:
    jobs = {
        name: replace(job, status=JobStatus.CANCELLED) if job.status in _OPEN_JOB else job
        for name, job in request.jobs.items()
    }
    failed = replace(
        request,
        status=Status.FAILED,
        jobs=jobs,
        dispatched=0,
        error={"task": task, "message": message},
        updated_at=now,
    )
    return failed, [Withdraw(request.id), Fail(request.id, message, task)]


def _dispatch(
    request: Request, jobs: dict[str, Job], ready: list[Task], now: float
) -> tuple[Request, list[Effect]]:
    """Queue the ready tasks; ``jobs`` is the new request's own copy, added to here."""
    effects: list[Effect] = []
    dispatched = request.dispatched
    for task in ready:
        try:
            value = task_input(request, task)
        except MappingError as exc:
            return _fail(replace(request, jobs=jobs), task.name, f"task {task.name!r}: {exc}", now)
        jobs[task.name] = Job(task.name, task.service, JobStatus.QUEUED, 1, value, queued_at=now)
        dispatched |= task.value
        effects.append(Dispatch(request.id, task.name, 1, task.service, value, now, task.timeout))
    return replace(request, jobs=jobs, dispatched=dispatched, updated_at=now), effects


def context(request: Request, upstream: Iterable[Task]) -> dict[str, Any]:
    """What a mapping sees: the request input, the results of the given tasks that are
    done (by name and by output key) and the client's params."""
    tasks: dict[str, Any] = {}
    ctx: dict[str, Any] = {"input": request.input, "tasks": tasks, "params": request.plan.params}
    jobs = request.jobs
    for task in upstream:
        job = jobs.get(task.name)
        if job is not None and job.status == JobStatus.COMPLETE:
            tasks[task.name] = job.result
            if task.output is not None:
                ctx[task.output] = job.result
    return ctx


def task_input(request: Request, task: Task) -> Any:
    """The input of a task that is ready, from its mapping or the default rule."""
    if task.input is not None:
        return task.input.render(context(request, request.plan.upstream(task)), "input")
    if not task.after:
        return request.input
    if len(task.after) == 1:
        return request.jobs[task.after[0]].result
    return {name: request.jobs[name].result for name in task.after}


def _result(request: Request) -> Any:
    plan = request.plan
    if plan.result is not None:
        return plan.result.render(context(request, plan.tasks), "result")
    sinks = plan.sinks
    if len(sinks) == 1:
        return request.jobs[sinks[0].name].result
    return {t.output or t.name: request.jobs[t.name].result for t in sinks}

"""The request state machine: ``advance(request, event, now) -> (request, effects)``.

Pure: no I/O, no clock (``now`` is an argument), no randomness. An event that does not
apply (a duplicate report, a stale attempt, anything after the request ended) returns the
very same request object and no effects, so callers can tell "nothing changed" by
identity. That is what makes delivery at-least-once but application exactly-once.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Job:
    """One task of one request: its latest attempt and, once done, its result."""

    task: str
    service: str
    status: JobStatus
    attempts: int
    input: Any
    result: Any = None
    error: str | None = None
    queued_at: float = 0.0
    finished_at: float | None = None

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


@dataclass(frozen=True)
class JobFailed:
    task: str
    attempt: int
    error: str
    #: False for failures that another attempt cannot fix.
    retryable: bool = True


@dataclass(frozen=True)
class Cancelled:
    reason: str = "cancelled by a client"


Event = Started | JobDone | JobFailed | Cancelled


def advance(request: Request, event: Event, now: float) -> tuple[Request, list[Effect]]:
    """Apply one event. Returns the new request and what must happen because of it."""
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
        return _job_done(request, job, event.result, now)
    return _job_failed(request, job, event, now)


def _job_done(request: Request, job: Job, result: Any, now: float) -> tuple[Request, list[Effect]]:
    plan = request.plan
    task = plan.by_name[job.task]
    jobs = dict(request.jobs)
    jobs[job.task] = replace(
        job, status=JobStatus.COMPLETE, result=result, error=None, finished_at=now
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
    if event.retryable and job.attempts <= task.retries:
        delay = min(task.max_backoff, task.backoff * 2 ** (job.attempts - 1))
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
    tries = f"{job.attempts} attempt{'s' if job.attempts > 1 else ''}"
    request = replace(request, jobs=jobs)
    return _fail(request, task.name, f"task {task.name!r} failed after {tries}: {event.error}", now)


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

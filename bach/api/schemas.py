"""Shapes of the HTTP API's bodies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from bach.core.limits import KEY_PATTERN, KEY_RULE, MAX_INT_KEY, Limits, clean_text, dumps
from bach.core.machine import Request
from bach.runtime.codec import Head

#: Characters of a result shown in a listing.
PREVIEW = 200
#: Characters of an error message shown in a listing.
ERROR_TEXT = 500


#: A tracking key: also one segment of a URL path, so ``/api/requests/{key}`` reaches it.
#: Checked by bach.core.limits.check_key, whose reasons are clearer than a union's.
Key = Annotated[
    Any,
    Field(
        description=f"tracking key: {KEY_RULE}, at most {Limits.key} characters by default "
        "(--max-key); an integer is read as its digits; the same key twice gives the "
        "same request",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "pattern": f"^{KEY_PATTERN}$", "maxLength": Limits.key},
                {"type": "integer", "minimum": 0, "maximum": MAX_INT_KEY},
            ]
        },
    ),
]


class SubmitBody(BaseModel):
    """A request: an input and what to run on it (exactly one of rubric, client, todo)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": 5, "todo": ["B", "A"]},
                {"rubric": "image", "input": {"w": 640}, "key": "o-7"},
            ],
            # Exactly one of rubric, client and todo, not null (null counts as not given).
            "oneOf": [
                {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                for name in ("rubric", "client", "todo")
            ],
        },
    )

    input: Any = Field(
        None,
        description="the request's input: any JSON value (at most 1 MiB and 64 levels "
        "deep by default: --max-input, --max-depth)",
    )
    rubric: StrictStr | None = Field(None, description="a rubric of the score")
    client: StrictStr | None = Field(None, description="a client whose setup names the rubric")
    todo: list[StrictStr] | None = Field(
        None,
        description="services to run in this order (at most 1000 by default: --max-tasks)",
        # Documented here, enforced by the engine (whose limit is configurable).
        json_schema_extra={"minItems": 1, "maxItems": Limits.tasks},
    )
    key: Key | None = None


class AttemptView(BaseModel):
    """One attempt of a job that ended."""

    model_config = ConfigDict(extra="allow")

    attempt: int = Field(description="the dispatch it ran under (lost ones share one)")
    outcome: str = Field(description="ok, failed or lost")
    round: int = Field(0, description="0, then one more per retry of the request")
    worker: str | None = Field(None, description="host:pid:service of the instance")
    host: str | None = None
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error: dict[str, Any] | None = Field(
        None, description="type, message, and traceback (a handler) or stderr (a program)"
    )
    reason: str | None = Field(None, description="why a lost attempt was lost")


class JobView(BaseModel):
    service: str
    status: str
    attempts: int = Field(description="attempts made, lost ones included")
    input: Any
    result: Any = None
    error: str | None = None
    worker: str | None = None
    history: list[AttemptView] = Field(default_factory=list, description="oldest first")


class RequestView(BaseModel):
    """A request with the trace of every job (``GET /api/requests/{ref}``)."""

    id: str
    key: str
    status: str
    rubric: str
    client: str | None
    input: Any
    tasks: list[str]
    jobs: dict[str, JobView]
    result: Any = None
    error: dict[str, Any] | None = None
    created_at: float
    updated_at: float
    trace: list[dict[str, Any]] = Field(
        default_factory=list, description="what happened beyond the jobs: retries"
    )
    unreadable: list[str] | None = Field(
        None,
        description="parts of a stored record that could not be rendered (written by an "
        "older version of Bach), shown as null",
    )


class RequestSummary(BaseModel):
    """One line of a listing: what a request is and where it stands, not its data."""

    id: str
    key: str
    status: str
    rubric: str | None = None
    client: str | None = None
    tasks: int = 0
    jobs: dict[str, int] = Field(default_factory=dict, description="jobs by status")
    error: dict[str, Any] | None = None
    result_preview: str | None = Field(
        None, description=f"the start of the result's JSON text (at most {PREVIEW} characters)"
    )
    created_at: float
    updated_at: float
    unreadable: str | None = Field(None, description="why the stored record cannot be read")


class RequestList(BaseModel):
    requests: list[RequestSummary]
    next: float | None = Field(
        None, description="pass as ?before= for the next page; null on the last page"
    )


def view_of(request: Request, leased: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The client's view (RequestView); ``leased`` (task -> worker) marks jobs being worked
    on."""
    leased = leased or {}
    jobs = {}
    for name, job in request.jobs.items():
        status = job.status.value
        if status == "QUEUED" and name in leased:
            status = "RUNNING"
        jobs[name] = {
            "service": job.service,
            "status": status,
            "attempts": max(job.attempts, len(job.history)),
            "input": job.input,
            "result": job.result,
            "error": job.error,
            "worker": leased.get(name),
            "history": [dict(a) for a in job.history],
        }
    status = request.status.value
    if status == "PENDING" and leased:
        status = "RUNNING"
    return {
        "id": request.id,
        "key": request.key,
        "status": status,
        "rubric": request.plan.name,
        "client": request.client,
        "input": request.input,
        "tasks": [t.name for t in request.plan.tasks],
        "jobs": jobs,
        "result": request.result,
        "error": dict(request.error) if request.error else None,
        "created_at": request.created_at,
        "updated_at": request.updated_at,
        "trace": [dict(t) for t in request.trace],
    }


def readable(view: dict[str, Any]) -> bytes:
    """The view's JSON text. A part that cannot be written (a record from before the
    limits: nested too deep, a lone surrogate) is shown as null and named in
    ``unreadable``, so one bad record never breaks a page."""
    try:
        return dumps(view).encode("utf-8")
    except UnicodeEncodeError:
        try:
            cleaned = dumps(clean(view)).encode("utf-8")
        except (ValueError, TypeError, RecursionError):
            pass
        else:
            return cleaned
    except (ValueError, TypeError, RecursionError):
        pass
    places = [(view, "input", "input"), (view, "result", "result")]
    for name, job in view["jobs"].items():
        places += [(job, "input", f"jobs.{name}.input"), (job, "result", f"jobs.{name}.result")]
    problems = []
    for holder, field, where in places:
        try:
            dumps(clean(holder[field])).encode("utf-8")
        except (ValueError, TypeError, RecursionError) as exc:
            holder[field] = None
            problems.append(f"{where}: {type(exc).__name__}")
    view["unreadable"] = problems
    return dumps(clean(view)).encode("utf-8")


def readable_page(value: Any) -> bytes:
    """JSON text of a value made of checked parts; strings that cannot be written (from
    a record older than the checks) are written as escapes rather than failing."""
    try:
        return dumps(value).encode("utf-8")
    except UnicodeEncodeError:
        return dumps(clean(value)).encode("utf-8")


def clean(value: Any) -> Any:
    """Strings made storable (see clean_text) in a value that is otherwise JSON."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def summary_of(head: Head) -> dict[str, Any]:
    """A RequestSummary: at most a few KB whatever the request holds."""
    request = head.request
    error = None
    if request.error:
        error = {
            k: clean_text(v, ERROR_TEXT) if isinstance(v, str) else v
            for k, v in request.error.items()
            if isinstance(v, str | int | float | bool) or v is None
        }
    preview = None
    if request.result is not None:
        try:
            preview = clean_text(dumps(request.result)[: PREVIEW + 1], PREVIEW)
        except (ValueError, TypeError, RecursionError) as exc:
            preview = f"(unreadable: {type(exc).__name__})"
    return {
        "id": request.id,
        "key": clean_text(request.key, 200),
        "status": request.status.value,
        "rubric": request.plan.name,
        "client": request.client,
        "tasks": len(request.plan.tasks),
        "jobs": dict(head.counts),
        "error": error,
        "result_preview": preview,
        "created_at": request.created_at,
        "updated_at": request.updated_at,
    }


class ErrorBody(BaseModel):
    type: str
    field: str
    reason: str


class ErrorView(BaseModel):
    error: ErrorBody


class CommandCall(BaseModel):
    """One top-level command of a run."""

    model_config = ConfigDict(extra="forbid")

    command: StrictStr = Field(description="the command's name")
    request: Any = Field(None, description="its request: any JSON value")
    name: StrictStr | None = Field(None, description="its key in the run (default: command)")


class CommandBody(BaseModel):
    """Seed 004's submission: a tracking key and the commands to run, in order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"key": "order-7", "commands": [{"command": "CommandOne", "request": 1}]}]
        },
    )

    key: Key | None = None
    commands: list[CommandCall] = Field(
        min_length=1,
        description="at most 1000 by default (--max-tasks); each name (or command, when it "
        "has no name) at most once",
        json_schema_extra={"maxItems": Limits.tasks},
    )


class CommandSummary(BaseModel):
    """One line of a listing of command runs: what a run runs and where it stands."""

    id: str
    key: str
    status: str = Field(description="PENDING, RUNNING, COMPLETE, FAILED or CANCELLED")
    commands: dict[str, str] = Field(
        default_factory=dict, description="the run's top-level calls: name -> command"
    )
    error: dict[str, Any] | None = None
    created_at: float
    updated_at: float
    unreadable: str | None = Field(None, description="why the stored record cannot be read")


class CommandList(BaseModel):
    runs: list[CommandSummary]
    next: float | None = Field(
        None, description="pass as ?before= for the next page; null on the last page"
    )

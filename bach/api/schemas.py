"""Shapes of the HTTP API's bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bach.core.machine import Request


class SubmitBody(BaseModel):
    """A request: an input and what to run on it (exactly one of rubric, client, todo)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": 5, "todo": ["B", "A"]},
                {"rubric": "image", "input": {"w": 640}, "key": "o-7"},
            ]
        },
    )

    input: Any = Field(None, description="the request's input: any JSON value")
    rubric: str | None = Field(None, description="a rubric of the score")
    client: str | None = Field(None, description="a client whose setup names the rubric")
    todo: list[str] | None = Field(None, description="services to run in this order")
    key: str | None = Field(
        None, description="tracking key; the same key twice gives the same request"
    )


class JobView(BaseModel):
    service: str
    status: str
    attempts: int
    input: Any
    result: Any = None
    error: str | None = None
    worker: str | None = None


class RequestView(BaseModel):
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

    @classmethod
    def of(cls, request: Request, leased: dict[str, str] | None = None) -> RequestView:
        """The client's view; ``leased`` (task -> worker) marks jobs being worked on."""
        leased = leased or {}
        jobs = {}
        for name, job in request.jobs.items():
            status = job.status.value
            if status == "QUEUED" and name in leased:
                status = "RUNNING"
            jobs[name] = JobView(
                service=job.service,
                status=status,
                attempts=job.attempts,
                input=job.input,
                result=job.result,
                error=job.error,
                worker=leased.get(name),
            )
        status = request.status.value
        if status == "PENDING" and leased:
            status = "RUNNING"
        return cls(
            id=request.id,
            key=request.key,
            status=status,
            rubric=request.plan.name,
            client=request.client,
            input=request.input,
            tasks=[t.name for t in request.plan.tasks],
            jobs=jobs,
            result=request.result,
            error=dict(request.error) if request.error else None,
            created_at=request.created_at,
            updated_at=request.updated_at,
        )


class RequestList(BaseModel):
    requests: list[RequestView]


class ErrorBody(BaseModel):
    type: str
    field: str
    reason: str


class ErrorView(BaseModel):
    error: ErrorBody


class CommandCall(BaseModel):
    """One top-level command of a run."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(description="the command's name")
    request: Any = Field(None, description="its request: any JSON value")
    name: str | None = Field(None, description="its key in the run (default: command)")


class CommandBody(BaseModel):
    """Seed 004's submission: a tracking key and the commands to run, in order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"key": "order-7", "commands": [{"command": "CommandOne", "request": 1}]}]
        },
    )

    key: str | int | None = Field(None, description="the same key again returns the same run")
    commands: list[CommandCall] = Field(min_length=1)

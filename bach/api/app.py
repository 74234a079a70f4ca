"""The HTTP API: requests in, their state out, and the system's figures.

Every error is JSON ``{"error": {"type", "field", "reason"}}`` with a 4xx status; a
stack trace never reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from bach import __version__
from bach.api.body import body_schema, first_error, read_model
from bach.api.schemas import (
    CommandBody,
    CommandCall,
    CommandList,
    ErrorView,
    RequestList,
    RequestView,
    SubmitBody,
    readable,
    readable_page,
    summary_of,
    view_of,
)
from bach.backends import redact_url
from bach.backends.port import Stats
from bach.commands.runner import CommandRunner
from bach.core.machine import Request as BachRequest
from bach.core.scaling import INSTANCE_STATES
from bach.errors import BachError, Conflict, NotFound
from bach.runtime import metrics as meters
from bach.runtime.codec import Head
from bach.runtime.engine import Engine, Submission, Unreadable

log = logging.getLogger("bach.api")

#: Longest a client may ask to wait for a request to end, in seconds.
MAX_WAIT = 300.0
#: Jobs in a request beyond which its view is rendered off the event loop.
LARGE_VIEW = 200

StatsExtra = Callable[[Stats], Awaitable[dict[str, Any]]]


class Unauthorized(BachError):
    status = 401


def _error(status: int, type_: str, field: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "field": field, "reason": reason}}, status)


async def _bach_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BachError)
    return _error(exc.status, type(exc).__name__, exc.field, exc.reason)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = first_error(exc.errors())
    return _error(error.status, type(error).__name__, error.field, error.reason)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = _error(exc.status_code, "HTTPError", "path", str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:  # Starlette names the first route's methods only
        response.headers["allow"] = ", ".join(_allowed(request))
    return response


def _allowed(request: Request) -> list[str]:
    """Every method the API document gives this path."""
    given = request.url.path.strip("/").split("/")
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        parts = template.strip("/").split("/")
        if len(parts) == len(given) and all(
            part.startswith("{") or part == seg for part, seg in zip(parts, given, strict=True)
        ):
            methods |= {method.upper() for method in operations}
    return sorted(methods) or ["GET"]


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return _error(500, "InternalError", "", f"{type(exc).__name__}: {exc}")


async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _authorize(request: Request) -> None:
    token: str | None = request.app.state.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("authorization", "a valid bearer token is required")


EngineDep = Annotated[Engine, Depends(_engine)]
Wait = Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for the end")]
StatusFilter = Annotated[str | None, Query(pattern="^(PENDING|RUNNING|COMPLETE|FAILED|CANCELLED)$")]
router = APIRouter(prefix="/api", dependencies=[Depends(_authorize)])


async def _view(engine: Engine, request: BachRequest, status: int = 200) -> Response:
    leased = {} if request.terminal else await engine.backend.leased(request.id)
    view = view_of(request, leased)
    if len(request.jobs) > LARGE_VIEW:
        body = await asyncio.to_thread(readable, view)
    else:
        body = readable(view)
    return Response(body, status, media_type="application/json")


SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": RequestView, "description": "The key was used before: that request."},
    201: {"model": RequestView, "description": "A new request."},
}


@router.post(
    "/requests",
    status_code=201,
    response_model=RequestView,
    responses=SUBMIT_RESPONSES,
    openapi_extra=body_schema("SubmitBody"),
)
async def submit(http: Request, engine: EngineDep, wait: Wait = 0) -> Response:
    """Start a request (or, with a key already used, return that request)."""
    body = await read_model(http, SubmitBody, engine.limits)
    request, created = await engine.submit(
        Submission(
            input=body.input, rubric=body.rubric, client=body.client, todo=body.todo, key=body.key
        )
    )
    if wait:
        request = await engine.wait(request.id, wait, current=request)
    return await _view(engine, request, 201 if created else 200)


@router.get("/requests/{ref}", response_model=RequestView)
async def get_request(ref: str, engine: EngineDep, wait: Wait = 0) -> Response:
    """A request by id or tracking key, with the trace of every job."""
    request = await (engine.wait(ref, wait) if wait else engine.get(ref))
    return await _view(engine, request)


def _summary(item: Head | Unreadable) -> dict[str, Any]:
    if isinstance(item, Unreadable):
        r = item.record
        return {
            "id": r.id,
            "key": r.key,
            "status": r.status,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "unreadable": item.reason,
        }
    return summary_of(item)


@router.get("/requests", response_model=RequestList)
async def list_requests(
    engine: EngineDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        float | None, Query(description="only requests created before this time (paging)")
    ] = None,
) -> Response:
    """Newest first, as summaries (the full request is one GET away); ``next`` is the
    ``before`` of the next page."""
    found, more = await engine.list_requests(status, limit, before)
    page = {"requests": [_summary(item) for item in found], "next": more}
    return Response(readable_page(page), media_type="application/json")


@router.delete("/requests/{ref}", response_model=RequestView)
async def cancel(ref: str, engine: EngineDep) -> Response:
    """Cancel a request that has not ended: its queued jobs are withdrawn and its running
    ones stopped."""
    request = await engine.get(ref)
    if request.terminal:
        raise Conflict("status", f"request {request.id} has already ended ({request.status})")
    return await _view(engine, await engine.cancel(ref))


@router.post("/requests/{ref}/cancel", response_model=RequestView)
async def cancel_post(ref: str, engine: EngineDep) -> Response:
    """Cancel, as ``DELETE /api/requests/{ref}``."""
    return await cancel(ref, engine)


@router.post("/requests/{ref}/retry", response_model=RequestView)
async def retry(ref: str, engine: EngineDep) -> Response:
    """Run a FAILED or CANCELLED request again from the tasks that did not complete,
    keeping the results of those that did."""
    return await _view(engine, await engine.retry(ref))


def _runner(engine: Engine) -> CommandRunner:
    if engine.commands is None:
        raise NotFound("command", "this system runs no commands")
    return engine.commands


COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The key was used before: that run's CommandState tree."},
    201: {"description": "A new run's CommandState tree."},
}


@router.post(
    "/commands",
    status_code=201,
    responses=COMMAND_RESPONSES,
    openapi_extra=body_schema("CommandBody"),
)
async def submit_command(http: Request, engine: EngineDep, wait: Wait = 0) -> Response:
    """Start a command run (seed 004); answers at once with its CommandState tree, or
    with the first run when the key was used before."""
    runner = _runner(engine)
    body = await read_model(http, CommandBody, engine.limits)
    items = [call.model_dump() for call in body.commands]
    run, created = await runner.submit(items, body.key)
    if wait:
        run = await runner.wait(run.id, wait)
    return Response(
        readable_page(run.view()), 201 if created else 200, media_type="application/json"
    )


@router.get("/commands", response_model=CommandList)
async def list_commands(
    engine: EngineDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        float | None, Query(description="only runs created before this time (paging)")
    ] = None,
) -> Response:
    """Command runs newest first, as summaries (the tree is one GET away); ``next`` is
    the ``before`` of the next page. One page reads at most 10,000 stored records, so
    ``next`` may be given with fewer runs than ``limit``."""
    found, more = await _runner(engine).list_runs(status, limit, before)
    return Response(readable_page({"runs": found, "next": more}), media_type="application/json")


@router.get("/commands/{ref}")
async def get_command(ref: str, engine: EngineDep, wait: Wait = 0) -> Response:
    """A command run's CommandState tree, by id or key."""
    runner = _runner(engine)
    run = await (runner.wait(ref, wait) if wait else runner.get(ref))
    return Response(readable_page(run.view()), media_type="application/json")


@router.post("/commands/{ref}/cancel")
async def cancel_command(ref: str, engine: EngineDep) -> Response:
    """Cancel a run that has not ended (409 if it has): CANCELLED, its service jobs
    withdrawn, and no child call starts after; the calls that were running are marked
    FAILED with a ``Cancelled`` error. The CommandState tree."""
    run = await _runner(engine).cancel(ref)
    return Response(readable_page(run.view()), media_type="application/json")


@router.get("/events/scaling")
async def scaling_events(request: Request) -> dict[str, Any]:
    """Every scaling decision: time, service, from, to, reason (newest last)."""
    events = request.app.state.scaling_events
    return {"events": events() if events is not None else []}


@router.get("/stats")
async def stats(request: Request, engine: EngineDep) -> dict[str, Any]:
    """Active requests, active tasks, tasks still to run, and each service's figures."""
    return await gather_stats(request, engine)


async def gather_stats(request: Request, engine: Engine) -> dict[str, Any]:
    now = engine.clock()
    figures = await engine.backend.stats(now)
    services: dict[str, dict[str, Any]] = {}
    for name in engine.score.services:
        q = figures.queues.get(name)
        oldest = q.oldest_queued_at if q else None
        services[name] = {
            "queued": q.queued if q else 0,
            "delayed": q.delayed if q else 0,
            "running": q.running if q else 0,
            "oldest_queued_age": None if oldest is None else round(now - oldest, 3),
            "completed": q.completed if q else 0,
            "failed": q.failed if q else 0,
        }
    body: dict[str, Any] = {
        "time": now,
        "active_requests": figures.requests.get("PENDING", 0) + figures.requests.get("RUNNING", 0),
        "active_tasks": sum(s["running"] for s in services.values()),
        "queued_tasks": sum(s["queued"] for s in services.values()),
        # Tasks of the active requests not dispatched yet (seed 002's remaining bits),
        # summed by the store as each request's record changes.
        "tasks_to_run": figures.to_run,
        "requests": figures.requests,
        "reports_waiting": figures.reports,
        "services": services,
        # This process's engine: other engines on the same store count their own.
        "engine": {"applied_reports": engine.applied},
        "workers": await _workers(engine, now),
    }
    extra: StatsExtra | None = request.app.state.stats_extra
    if extra is not None:
        more = await extra(figures)  # the same snapshot: instance states agree with it
        for name, figs in more.pop("services", {}).items():
            services.setdefault(name, {}).update(figs)
        body.update(more)
    return body


async def _workers(engine: Engine, now: float) -> list[dict[str, Any]]:
    """Every worker alive on the store, supervised or started by hand, oldest first."""
    found = []
    for ident, info in (await engine.backend.present_workers(now)).items():
        try:
            entry = json.loads(info)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append({"id": ident, **entry})
    return sorted(found, key=lambda w: (w.get("since") or 0, w["id"]))


GAUGES = {
    "active_requests": "requests PENDING or RUNNING",
    "active_tasks": "jobs held by workers",
    "queued_tasks": "jobs waiting for a worker",
    "tasks_to_run": "tasks of active requests not dispatched yet",
    "reports_waiting": "results not applied yet",
}
SERVICE_GAUGES = {
    "queued": "jobs waiting for a worker",
    "delayed": "jobs waiting out a retry backoff",
    "running": "jobs held by workers",
    "instances": "worker instances up",
    "arrival_rate": "jobs queued per second, last 2 s",
    "service_time": "seconds a job runs (EWMA of measured jobs)",
    "completed": "jobs reported done, by every worker on the store",
    "failed": "job attempts that failed, by every worker on the store",
    "oldest_queued_age": "seconds the oldest queued job has waited",
}


async def metrics(request: Request) -> Response:
    """The stats in Prometheus's text format, with the engine's counters
    (``bach.runtime.metrics``)."""
    body = await gather_stats(request, request.app.state.engine)
    registry = CollectorRegistry()
    for name, text in GAUGES.items():
        Gauge(f"bach_{name}", text, registry=registry).set(body.get(name) or 0)
    for name, text in SERVICE_GAUGES.items():
        gauge = Gauge(f"bach_service_{name}", text, ["service"], registry=registry)
        for service, figures in body["services"].items():
            value = figures.get(name)
            if isinstance(value, (int, float)):
                gauge.labels(service).set(value)
    bottleneck = Gauge(
        "bach_service_bottleneck",
        "1 when the service is the bottleneck",
        ["service"],
        registry=registry,
    )
    for service, figures in body["services"].items():
        bottleneck.labels(service).set(1 if figures.get("bottleneck") else 0)
    by_state = Gauge(
        "bach_service_instances_by_state",
        "worker instances in each state (starting, busy, idle, draining)",
        ["service", "state"],
        registry=registry,
    )
    for service, figures in body["services"].items():
        states = list(figures.get("instance_states", {}).values())
        for state in INSTANCE_STATES:
            by_state.labels(service, state).set(states.count(state))
    # The engine's counters, collected with the gauges: one document, each name once.
    meters.declare(body["services"])
    registry.register(meters.collector())
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def healthz(engine: EngineDep) -> JSONResponse:
    """Whether the engine and its store answer."""
    started = time.perf_counter()
    try:
        await engine.backend.stats(engine.clock())
    except Exception as exc:
        return JSONResponse({"ok": False, "store": f"unavailable: {exc}"}, 503)
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    return JSONResponse(
        {
            "ok": True,
            "store": redact_url(engine.backend.url),
            "store_ms": elapsed,
            "version": __version__,
        }
    )


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    stats_extra: StatsExtra | None = None,
    scaling_events: Callable[[], list[dict[str, Any]]] | None = None,
) -> FastAPI:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorView} for code in (400, 401, 404, 405, 409, 413, 415, 422)
    }
    app = FastAPI(
        title="Bach",
        version=__version__,
        description="Send requests through pipelines of services; watch every step.",
        responses=errors,
    )
    app.state.engine = engine
    app.state.token = token
    app.state.stats_extra = stats_extra
    app.state.scaling_events = scaling_events
    app.add_exception_handler(BachError, _bach_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        responses={503: {"description": "The store does not answer."}},
    )
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        dependencies=[Depends(_authorize)],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    _publish_bodies(app)
    return app


def _publish_bodies(app: FastAPI) -> None:
    """Put the bodies that routes read themselves (read_model) into the OpenAPI
    document's components, where their routes' requestBody points."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            found = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (SubmitBody, CommandBody, CommandCall):
                shape = model.model_json_schema(ref_template="#/components/schemas/{model}")
                shape.pop("$defs", None)
                found[model.__name__] = shape
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

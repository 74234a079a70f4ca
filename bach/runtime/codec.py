"""Between core objects and the backend's records: JSON in, JSON out.

A request is stored in pieces, so that a step writes what it changed and nothing else:

- the **header** (``RequestRecord.body``): status, the done and dispatched bitmasks (as
  hex), result, error, times, version and the count of jobs by status; small, and
  rewritten by every step;
- the **parts** (``RequestRecord.parts``): ``input`` (written once, when the request is
  accepted) and ``job:<task>`` for each job (written when that job changes).

The store keeps the version that last wrote each part, and the engine keeps the requests
it works on (``Known``), so a step reads the header and only the parts written since the
version it holds: none at all when it wrote the last version itself.

A record written before the split holds everything in its body; it is read as it is, and
its next step writes every part.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bach.backends.port import Backend, JobRecord, RequestRecord
from bach.core.effects import Dispatch
from bach.core.machine import Job, Request
from bach.core.rubric import Plan

INPUT = "input"
JOB = "job:"


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def counts_of(request: Request) -> dict[str, int]:
    """Jobs by status. While a request is active its jobs are done or in flight (a
    failure either queues the next attempt or ends the request), so the bitmasks tell;
    only an ended request's jobs are counted one by one, once."""
    if request.terminal:
        counts: dict[str, int] = {}
        for job in request.jobs.values():
            counts[job.status.value] = counts.get(job.status.value, 0) + 1
        return counts
    found = {"COMPLETE": request.done.bit_count(), "QUEUED": request.dispatched.bit_count()}
    return {status: n for status, n in found.items() if n}


def _header(request: Request) -> str:
    return dumps(
        {
            "id": request.id,
            "key": request.key,
            "status": request.status.value,
            # Hex: a bitmask of thousands of tasks in decimal costs quadratic time.
            "done": f"{request.done:x}",
            "dispatched": f"{request.dispatched:x}",
            "result": request.result,
            "error": dict(request.error) if request.error is not None else None,
            "created_at": request.created_at,
            "updated_at": request.updated_at,
            "client": request.client,
            "version": request.version,
            "submitted": request.submitted,
            "round": request.round,
            "trace": [dict(t) for t in request.trace],
            "counts": counts_of(request),
        }
    )


def _mask(value: int | str) -> int:
    return value if isinstance(value, int) else int(value, 16)


def _record(request: Request, body: str, parts: Mapping[str, str]) -> RequestRecord:
    return RequestRecord(
        id=request.id,
        key=request.key,
        status=request.status.value,
        version=request.version,
        plan_id=request.plan.digest,
        body=body,
        created_at=request.created_at,
        updated_at=request.updated_at,
        to_run=0 if request.terminal else request.remaining(),
        parts=parts,
    )


@dataclass(frozen=True)
class Known:
    """A request as the store holds it at ``request.version``, with the size of each of
    its parts: what the next step starts from."""

    request: Request
    sizes: Mapping[str, int]
    #: Characters of all parts together.
    parts: int
    #: Characters of the header.
    header: int
    #: Read from a record written before the split: its next step writes every part.
    whole: bool = False

    @property
    def size(self) -> int:
        """Characters the request takes in the store."""
        return self.header + self.parts


def _known(request: Request, body: str, parts: Mapping[str, str], base: Known | None) -> Known:
    sizes = dict(base.sizes) if base is not None else {}
    total = base.parts if base is not None else 0
    for name, text in parts.items():
        total += len(text) - sizes.get(name, 0)
        sizes[name] = len(text)
    return Known(request, sizes, total, len(body))


def to_record(request: Request) -> tuple[RequestRecord, Known]:
    """A new request's record, every part included."""
    parts = {INPUT: dumps(request.input)}
    for name, job in request.jobs.items():
        parts[JOB + name] = dumps(job.to_dict())
    body = _header(request)
    return _record(request, body, parts), _known(request, body, parts, None)


def to_change(old: Known, new: Request) -> tuple[RequestRecord, Known]:
    """The record that takes ``old`` to ``new``: the header and the jobs that changed (a
    job the machine did not touch is the very same object)."""
    if old.whole:
        record, known = to_record(new)
        return record, known
    before = old.request.jobs
    parts = {
        JOB + name: dumps(job.to_dict())
        for name, job in new.jobs.items()
        if before.get(name) is not job
    }
    body = _header(new)
    return _record(new, body, parts), _known(new, body, parts, old)


def from_record(record: RequestRecord, plan: Plan, base: Known | None = None) -> Known:
    """The request a record holds. ``base``: the request at the version the record's
    parts were read since (they are applied over it); without it the record must carry
    every part."""
    data = json.loads(record.body)
    if "jobs" in data:  # written before the split
        request = Request.from_dict(data, plan)
        return Known(request, {}, 0, len(record.body), whole=True)
    if base is not None and base.whole:
        base = None
    parts = record.parts
    if parts is None:
        if base is None or base.request.version != record.version:
            raise LookupError(f"request {record.id} was read without its parts")
        return base
    jobs = dict(base.request.jobs) if base is not None else {}
    value = base.request.input if base is not None else None
    for name, text in parts.items():
        if name == INPUT:
            value = json.loads(text)
        elif name.startswith(JOB):
            task = name[len(JOB) :]
            jobs[task] = Job.from_dict(task, json.loads(text))
    if base is None and INPUT not in parts:
        raise LookupError(f"request {record.id} has no stored input")
    request = _from_header(data, plan, value, jobs)
    return _known(request, record.body, parts, base)


def _from_header(
    data: Mapping[str, Any], plan: Plan, value: Any, jobs: Mapping[str, Job]
) -> Request:
    fields = {**data, "input": value, "jobs": {}}
    fields.update(done=_mask(data["done"]), dispatched=_mask(data["dispatched"]))
    return replace(Request.from_dict(fields, plan), jobs=jobs)


@dataclass(frozen=True)
class Head:
    """A request as a listing shows it: its header, read without its parts (``request``
    has no jobs and no input)."""

    request: Request
    counts: Mapping[str, int]


def head_of(record: RequestRecord, plan: Plan) -> Head:
    data = json.loads(record.body)
    if "jobs" in data:  # written before the split
        request = Request.from_dict(data, plan)
        return Head(request, counts_of(request))
    return Head(_from_header(data, plan, None, {}), data.get("counts", {}))


def to_jobs(dispatches: Sequence[Dispatch]) -> tuple[JobRecord, ...]:
    return tuple(
        JobRecord(
            d.job_id,
            d.request_id,
            d.task,
            d.attempt,
            d.service,
            dumps(d.input),
            d.not_before,
            d.timeout,
        )
        for d in dispatches
    )


class Plans:
    """Plans by digest, loaded from the store once and kept (they never change)."""

    def __init__(self, backend: Backend, size: int = 4096) -> None:
        self._backend = backend
        self._size = size
        self._cache: OrderedDict[str, Plan] = OrderedDict()

    def remember(self, plan: Plan) -> None:
        self._cache[plan.digest] = plan
        self._cache.move_to_end(plan.digest)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)

    async def get(self, plan_id: str) -> Plan:
        plan = self._cache.get(plan_id)
        if plan is None:
            body = await self._backend.plan(plan_id)
            if body is None:
                raise LookupError(f"plan {plan_id} is missing from the store")
            plan = Plan.from_dict(json.loads(body))
            self.remember(plan)
        return plan


class Held:
    """The requests an engine is working on, as it last read or wrote them: a bounded
    map, newest last, so that a step on a request this engine moved last reads nothing
    but the header."""

    def __init__(self, size: int = 1024, chars: int = 256 * 1024 * 1024) -> None:
        self._size = size
        self._chars = chars
        self._total = 0
        self._known: OrderedDict[str, Known] = OrderedDict()

    def get(self, request_id: str) -> Known | None:
        return self._known.get(request_id)

    def put(self, known: Known) -> None:
        rid = known.request.id
        self.drop(rid)
        if known.request.terminal:  # nothing more to step
            return
        self._known[rid] = known
        self._total += known.size
        while self._known and (len(self._known) > self._size or self._total > self._chars):
            _, oldest = self._known.popitem(last=False)
            self._total -= oldest.size

    def drop(self, request_id: str) -> None:
        old = self._known.pop(request_id, None)
        if old is not None:
            self._total -= old.size

    def __len__(self) -> int:
        return len(self._known)

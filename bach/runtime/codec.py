"""Between core objects and the backend's records: JSON in, JSON out."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from bach.backends.port import Backend, JobRecord, RequestRecord
from bach.core.effects import Dispatch
from bach.core.machine import Request
from bach.core.rubric import Plan


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def to_record(request: Request) -> RequestRecord:
    return RequestRecord(
        id=request.id,
        key=request.key,
        status=request.status.value,
        version=request.version,
        plan_id=request.plan.digest,
        body=dumps(request.to_dict()),
        created_at=request.created_at,
        updated_at=request.updated_at,
        to_run=0 if request.terminal else request.remaining(),
    )


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

    async def request(self, record: RequestRecord) -> Request:
        plan = await self.get(record.plan_id)
        return Request.from_dict(json.loads(record.body), plan)

"""Reading and writing HTTP bodies: within limits, strict JSON, errors that name the field.

A body is refused before it is held in memory when its Content-Length is over the limit,
and while it streams in when it has none; it must be JSON (``application/json``, a
``+json`` type, or no type at all); it is parsed by ``bach.core.limits.parse_json``, off
the event loop when it is large, so one big body does not hold up other clients.
Responses are written the same way (compact UTF-8, never NaN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from bach.core.limits import Limits, option, parse_json, size_text
from bach.errors import BachError, InvalidInput, TooLarge

#: Bodies larger than this are parsed and rendered in a thread, off the event loop.
OFF_LOOP = 64 * 1024

M = TypeVar("M", bound=BaseModel)


class UnsupportedMediaType(BachError):
    status = 415


def _too_large(size: str, limit: int) -> TooLarge:
    return TooLarge(
        "body",
        f"the body is {size}; at most {size_text(limit)} is allowed ({option('body')})",
    )


def _check_type(request: Request) -> None:
    given = request.headers.get("content-type")
    if given is None:
        return  # curl -d without -H: read it as JSON, which is all this API takes
    kind = given.split(";")[0].strip().lower()
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    raise UnsupportedMediaType(
        "content-type", f"the body must be JSON (application/json), not {kind or 'empty'}"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or TooLarge as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(size_text(int(declared)), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {size_text(limit)}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limits: Limits) -> Any:
    """The body's JSON value, checked against ``limits`` (see the module docstring)."""
    _check_type(request)
    data = await read_body(request, limits.body)
    if len(data) > OFF_LOOP:
        parse = partial(parse_json, data, "body", limits.depth, fields=True)
        return await asyncio.to_thread(parse)
    return parse_json(data, "body", limits.depth, fields=True)


def first_error(errors: Sequence[Any]) -> InvalidInput:
    """Pydantic's first complaint as our error: the field's dotted path and the reason."""
    if not errors:
        return InvalidInput("body", "invalid")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    reason = str(first.get("msg", "invalid"))
    kind = first.get("type")
    if kind == "extra_forbidden":
        reason = "unknown field"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        reason = "the body must be a JSON object"
    return InvalidInput(".".join(loc) or "body", reason)


async def read_model(request: Request, model: type[M], limits: Limits) -> M:
    """The body as ``model``: strict JSON within limits, then pydantic's checks."""
    value = await read_json(request, limits)
    if not isinstance(value, dict):
        raise InvalidInput("body", "the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise first_error(exc.errors(include_url=False, include_input=False)) from None


def body_schema(model: str) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads its body with read_model."""
    schema = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

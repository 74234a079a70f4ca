"""Schemathesis against the live OpenAPI document of a real `bach serve` (issue 12, item 9).

Every operation gets schemathesis's examples, coverage and fuzzing phases, with valid and
invalid data, under every built-in check: no 5xx; the body, content type, headers and
status code of every response as the document says; invalid data refused with a 4xx;
valid data accepted.

``BACH_FUZZ_EXAMPLES`` sets the fuzzing examples per operation (``make fuzz`` raises it;
the default keeps this file within a minute), ``BACH_FUZZ_SEED`` replays a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, HookContext
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.helpers import EXAMPLES, FIXTURES, System, running_system

pytestmark = pytest.mark.slow

SCORES = [EXAMPLES / "arith.yaml", FIXTURES / "edge.yaml"]
EXAMPLES_PER_OPERATION = int(os.environ.get("BACH_FUZZ_EXAMPLES", "30"))
#: Longest ``wait`` sent, in seconds. The document allows 300, and a request the fuzzer
#: builds can run that long (a LoopingCommand, 1000 tasks), so an accepted wait would
#: make one example sit out minutes.
MAX_WAIT = 0.5
#: Seconds one HTTP call may take: with ``wait`` bounded, anything slower is a hang.
REQUEST_TIMEOUT = 30


def existing_refs(system: System) -> list[str]:
    """Ids and keys of requests and command runs that exist, so that the operations on
    ``{ref}`` are tried on something other than a 404: ended, still running, by key."""
    with httpx.Client(base_url=system.url, timeout=60) as http:
        ended = http.post(
            "/api/requests?wait=30", json={"todo": ["echo"], "input": {"a": [1]}, "key": "done-1"}
        ).json()
        running = http.post("/api/requests", json={"todo": ["A"] * 1000, "input": 0}).json()
        run = http.post(
            "/api/commands?wait=30",
            json={"key": "run-1", "commands": [{"command": "CommandOne", "request": 1}]},
        ).json()
    return [ended["id"], ended["key"], running["id"], run["id"], run["key"]]


def bounded_wait(_: HookContext, case: Case) -> Case:
    """A ``wait`` the API would accept and sit out, lowered to MAX_WAIT.

    Values the API refuses (negative, over 300, not a number) are sent as generated, so
    the bounds of ``wait`` are still tried; so is 0."""
    value = (case.query or {}).get("wait")
    if value is None or isinstance(value, bool):
        return case
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return case
    if math.isfinite(seconds) and MAX_WAIT < seconds <= 300:
        case.query["wait"] = MAX_WAIT
    return case


def repeats_a_name(case: Case) -> bool:
    """A run's commands need distinct names (a command's own name when it has none), so
    that each call is checkpointed under its own key. JSON Schema cannot say that, so
    such a body looks valid to the document; the API answers it 422 naming the repeated
    name (test_api's command errors test that)."""
    body = case.body
    if case.operation.path != "/api/commands" or not isinstance(body, dict):
        return False
    calls = body.get("commands")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return False
    names = [c.get("name") or c.get("command") for c in calls]
    return len(set(map(str, names))) < len(names)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    home: Path = tmp_path_factory.mktemp("schemathesis")
    with running_system(SCORES, f"sqlite:///{home}/bach.db", home) as system:
        settings: dict[str, Any] = {
            "request-timeout": REQUEST_TIMEOUT,
            # Reproducers name the key they sent, which would otherwise be "[Filtered]".
            "output": {"sanitization": {"enabled": False}},
            "generation": {"max-examples": EXAMPLES_PER_OPERATION, "database": "none"},
            "dictionaries": {"refs": {"values": existing_refs(system)}},
            "parameters": {"path.ref": {"dictionary": "refs", "probability": 0.5}},
        }
        if "BACH_FUZZ_SEED" in os.environ:
            settings["seed"] = int(os.environ["BACH_FUZZ_SEED"])
        config = schemathesis.Config.from_dict(settings)
        schema = schemathesis.openapi.from_url(f"{system.url}/openapi.json", config=config)
        schema.hook("map_case")(bounded_wait)
        yield schema


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis (4.32) renames the test node through `_nodeid`, which pytest 9.2 no
    # longer has; give it one.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_keeps_to_its_document(case: Case) -> None:
    if repeats_a_name(case):  # only "valid data is accepted" cannot hold; the rest must
        case.call_and_validate(excluded_checks=[positive_data_acceptance])
    else:
        case.call_and_validate()

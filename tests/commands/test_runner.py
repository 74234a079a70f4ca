"""Durable commands on every backend: composition, checkpoints, aliases, failures, resume."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest

import bach.commands as bach
from bach.backends.port import Backend
from bach.commands.runner import CommandRunner, Registry
from bach.commands.state import Status
from bach.core.score import Score
from bach.errors import InvalidInput, NotFound

CALLS: Counter[str] = Counter()
GATE = threading.Event()


class CommandTwo(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        CALLS["CommandTwo"] += 1
        return request + 2


class CommandOne(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        return context.execute(CommandTwo, request) + 1


class Looping(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        return sum(context.execute(CommandTwo, i, alias=f"call-{i}") for i in range(request))


class SameAliasTwice(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        return sum(context.execute(CommandTwo, i) for i in range(request))


class Gated(bach.Command):
    """Child 1, then wait for the gate, then child 2: a run to interrupt in the middle."""

    def execute(self, context: Any, request: int) -> int:
        first = context.execute(CommandTwo, request, alias="first")
        GATE.wait(10)
        return int(context.execute(CommandTwo, first, alias="second"))


@bach.command(name="Flaky", retries=2, backoff=0.01)
class FlakyImpl:
    def execute(self, context: Any, request: int) -> int:
        CALLS["Flaky"] += 1
        if CALLS["Flaky"] < 3:
            raise ConnectionError(f"attempt {CALLS['Flaky']} failed")
        return request


class Boom(bach.Command):
    def execute(self, context: Any, request: Any) -> Any:
        raise ValueError(f"cannot handle {request!r}")


class CatchesChildFailure(bach.Command):
    def execute(self, context: Any, request: Any) -> str:
        try:
            context.execute(Boom, request)
        except bach.CommandFailed as exc:
            return f"handled: {exc.reason}"
        return "unreachable"


class Unjsonable(bach.Command):
    def execute(self, context: Any, request: Any) -> Any:
        return {1, 2}


class AsyncOne(bach.Command):
    async def execute(self, context: Any, request: int) -> int:
        return int(await context.execute("CommandTwo", request)) * 10


COMMANDS = [
    CommandOne,
    CommandTwo,
    Looping,
    SameAliasTwice,
    Gated,
    FlakyImpl,
    Boom,
    CatchesChildFailure,
    Unjsonable,
    AsyncOne,
]


@pytest.fixture(autouse=True)
def _fresh() -> None:
    CALLS.clear()
    GATE.set()


def runner_on(backend: Backend, owner: str = "test:1:engine", **kwargs: Any) -> CommandRunner:
    registry = Registry()
    for cls in COMMANDS:
        registry.add(cls, "tests")
    return CommandRunner(backend, Score(), registry, owner, **kwargs)


async def run_one(runner: CommandRunner, name: str, request: Any) -> dict[str, Any]:
    run, _ = await runner.submit([{"command": name, "request": request}])
    return (await runner.wait(run.id, 10)).view()


async def test_seed_004_composition(backend: Backend) -> None:
    runner = runner_on(backend)
    submitted, created = await runner.submit([{"command": "CommandOne", "request": 1}], key="0")
    assert created
    assert submitted.view()["children"]["CommandOne"]["status"] in ("CREATED", "RUNNING")
    view = (await runner.wait("0", 10)).view()
    assert view["status"] == "COMPLETE"
    one = view["children"]["CommandOne"]
    assert (one["command"], one["request"], one["response"]) == ("CommandOne", 1, 4)
    two = one["children"]["CommandTwo"]
    assert (two["status"], two["command"], two["name"]) == ("COMPLETE", "CommandTwo", "CommandTwo")
    assert (two["request"], two["response"]) == (1, 3)
    # The same key returns the same run, not a second one.
    again, created = await runner.submit([{"command": "CommandOne", "request": 1}], key="0")
    assert again.id == view["id"] and not created
    await runner.close()


async def test_aliases_keep_repeated_calls_apart(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "Looping", 3)
    children = view["children"]["Looping"]["children"]
    assert {n: (c["command"], c["request"], c["response"]) for n, c in children.items()} == {
        "call-0": ("CommandTwo", 0, 2),
        "call-1": ("CommandTwo", 1, 3),
        "call-2": ("CommandTwo", 2, 4),
    }
    assert view["children"]["Looping"]["response"] == 9
    await runner.close()


async def test_the_same_key_twice_in_one_parent_is_a_clear_error(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "SameAliasTwice", 3)
    assert view["status"] == "FAILED"
    error = view["children"]["SameAliasTwice"]["error"]
    assert error["type"] == "DuplicateAlias"
    assert "'CommandTwo' is called twice" in error["message"] and "alias" in error["message"]
    assert CALLS["CommandTwo"] == 1  # the first call ran; the repeat was refused
    await runner.close()


async def test_a_run_interrupted_after_child_one_resumes_without_running_it_again(
    backend: Backend,
) -> None:
    GATE.clear()
    first = runner_on(backend, owner="host:1:engine")
    run, _ = await first.submit([{"command": "Gated", "request": 1}])
    for _ in range(200):
        stored = await runner_on(backend, owner="reader").get(run.id)
        if stored.root.children["Gated"].children.get("first", None) and (
            stored.root.children["Gated"].children["first"].status == Status.COMPLETE
        ):
            break
        await asyncio.sleep(0.02)
    await first.close()  # the engine is gone; its run stays RUNNING in the store
    assert (await backend.load(run.id)) is not None
    assert CALLS["CommandTwo"] == 1
    GATE.set()
    second = runner_on(
        backend, owner="host:2:engine", is_dead=lambda owner: owner == "host:1:engine"
    )
    assert await second.resume() == 1
    view = (await second.wait(run.id, 10)).view()
    assert view["status"] == "COMPLETE"
    gated = view["children"]["Gated"]
    assert gated["response"] == 5  # (1 + 2) + 2
    assert CALLS["CommandTwo"] == 2  # first once, second once: first came from the store
    assert gated["children"]["first"]["attempts"] == 1
    await second.close()


async def test_retries_then_success_and_failure_with_its_error(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "Flaky", 7)
    flaky = view["children"]["Flaky"]
    assert (view["status"], flaky["response"], flaky["attempts"]) == ("COMPLETE", 7, 3)
    failed = await run_one(runner, "Boom", "x")
    assert failed["status"] == "FAILED"
    assert failed["children"]["Boom"]["error"] == {
        "type": "ValueError",
        "message": "cannot handle 'x'",
    }
    assert failed["error"]["type"] == "ValueError"
    await runner.close()


async def test_a_parent_may_catch_a_failed_child(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "CatchesChildFailure", 1)
    parent = view["children"]["CatchesChildFailure"]
    assert view["status"] == "COMPLETE"
    assert parent["response"] == "handled: ValueError: cannot handle 1"
    assert parent["children"]["Boom"]["status"] == "FAILED"
    await runner.close()


async def test_a_response_that_is_not_json_fails_clearly(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "Unjsonable", None)
    error = view["children"]["Unjsonable"]["error"]
    assert view["status"] == "FAILED" and "not JSON-able" in error["message"]
    await runner.close()


async def test_async_commands_and_calls_by_name(backend: Backend) -> None:
    runner = runner_on(backend)
    view = await run_one(runner, "AsyncOne", 1)
    assert view["children"]["AsyncOne"]["response"] == 30
    await runner.close()


async def test_bad_submissions_name_the_field(backend: Backend) -> None:
    runner = runner_on(backend)
    with pytest.raises(NotFound, match="unknown command 'Nope'"):
        await runner.submit([{"command": "Nope"}])
    with pytest.raises(InvalidInput, match="used twice"):
        await runner.submit([{"command": "CommandTwo"}, {"command": "CommandTwo"}])
    with pytest.raises(InvalidInput, match=r"commands\[0\].request"):
        await runner.submit([{"command": "CommandTwo", "request": {1, 2}}])
    with pytest.raises(NotFound):
        await runner.get("no-such-run")
    await runner.close()

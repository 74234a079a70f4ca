"""Durable commands (seed 004): code whose child calls are checkpointed.

    import bach

    class CommandTwo(bach.Command):
        def execute(self, context, request):
            return request + 2

    class CommandOne(bach.Command):
        def execute(self, context, request):
            return context.execute(CommandTwo, request) + 1

``context.execute(CommandClass or "Name", request, alias=None)`` runs a child and stores
its response; when the parent runs again after a crash, a child that completed returns
its stored response without running. A name that is not a command names a score
service: the call goes through that service's queue and workers. ``async def execute``
works too: ``await context.execute(...)`` then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from bach.commands.state import Status
from bach.errors import BachError


class Command:
    """Base class for commands. Class attributes: ``name`` (default: the class name),
    ``retries`` (extra attempts after a failure) and ``backoff`` (seconds before the
    first retry, doubling each time)."""

    name: ClassVar[str | None] = None
    retries: ClassVar[int] = 0
    backoff: ClassVar[float] = 1.0

    def execute(self, context: Any, request: Any) -> Any:
        raise NotImplementedError


C = TypeVar("C", bound=type)


def command(
    name: str | None = None, *, retries: int | None = None, backoff: float | None = None
) -> Callable[[C], C]:
    """Name a command class, or give it a retry policy, without subclassing."""

    def mark(cls: C) -> C:
        if name is not None:
            cls.name = name  # type: ignore[attr-defined]
        if retries is not None:
            cls.retries = retries  # type: ignore[attr-defined]
        if backoff is not None:
            cls.backoff = backoff  # type: ignore[attr-defined]
        cls.__bach_command__ = True  # type: ignore[attr-defined]
        return cls

    return mark


def command_name(cls: type) -> str:
    return getattr(cls, "name", None) or cls.__name__


def is_command(obj: Any) -> bool:
    return (
        isinstance(obj, type)
        and callable(getattr(obj, "execute", None))
        and (issubclass(obj, Command) or getattr(obj, "__bach_command__", False))
        and obj is not Command
    )


class CommandFailed(BachError):
    """A child call ended FAILED; raised in the parent, which may catch it."""

    status = 500

    def __init__(self, name: str, error: dict[str, str]) -> None:
        super().__init__(name, f"{error['type']}: {error['message']}")
        self.error = error


class DuplicateAlias(BachError):
    """The same child key twice in one execution of a parent."""

    status = 422


__all__ = [
    "Command",
    "CommandFailed",
    "DuplicateAlias",
    "Status",
    "command",
    "command_name",
    "is_command",
]

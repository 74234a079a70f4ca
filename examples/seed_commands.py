"""Seed 004's commands, as a plugin module: `arith.yaml` names it under `plugins`.

An installed package advertises the same through the `bach.plugins` entry-point group:

    [project.entry-points."bach.plugins"]
    seed = "seed_commands"
"""

from __future__ import annotations

from typing import Any

import bach.commands as bach


class CommandTwo(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        return request + 2


class CommandOne(bach.Command):
    def execute(self, context: Any, request: int) -> int:
        j = context.execute(CommandTwo, request)
        return j + 1


class LoopingCommand(bach.Command):
    """Seed 004's loop: each call gets its own alias, so each is its own checkpoint."""

    def execute(self, context: Any, request: int) -> int:
        return sum(context.execute(CommandTwo, i, alias=f"CommandTwo-{i}") for i in range(request))


class AddThenDouble(bach.Command):
    """A command that calls the score's services A and B: commands and rubrics compose."""

    async def execute(self, context: Any, request: int) -> int:
        added = await context.execute("A", request)
        return int(await context.execute("B", added))

"""The exit statuses of the ``bach`` command, and the one place failures become them.

Every failure of every command is one line on stderr (``bach validate`` prints one line
per problem it finds) and one of these statuses; no traceback, unless ``BACH_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, NoReturn

import click

#: Done.
OK = 0
#: The request or command run failed, was cancelled, or had not ended when --wait ran out.
FAILED = 1
#: Bad usage or bad input: an option, a score, an input, a key; the server refused it.
USAGE = 2
#: The server or the store cannot be reached (or answers that it cannot do its part).
UNREACHABLE = 3
#: An internal error: a bug in Bach (or in the server it talks to).
INTERNAL = 4
#: Stopped by Ctrl-C (128 + SIGINT, as shells do).
INTERRUPTED = 130


def fail(message: str, status: int = USAGE) -> NoReturn:
    """One line on stderr, then exit."""
    click.echo(f"bach: error: {' '.join(message.split())}", err=True)
    sys.exit(status)


def status_of(exc: BaseException) -> int:
    """The exit status a known error stands for; INTERNAL for any other."""
    from bach.client import ClientError
    from bach.errors import BachError, StoreError, UnreadableRecord

    if isinstance(exc, ClientError):
        if exc.status is None or exc.kind in ("StoreError", "UnreadableRecord"):
            return UNREACHABLE
        if exc.status >= 500:
            return INTERNAL if exc.kind == "InternalError" else UNREACHABLE
        return USAGE
    if isinstance(exc, StoreError):
        # "store": it cannot be opened or reached; "url": the URL itself is wrong.
        return UNREACHABLE if exc.field == "store" else USAGE
    if isinstance(exc, UnreadableRecord):
        return UNREACHABLE
    if isinstance(exc, BachError):
        return USAGE
    return INTERNAL


def _usage_line(exc: click.ClickException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


class Main(click.Group):
    """The ``bach`` group: runs a command and turns whatever it raises into a status."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:  # usage errors, bad option values
            fail(_usage_line(exc), USAGE)
        except click.Abort:  # Ctrl-C or end of input at a prompt
            click.echo("bach: interrupted", err=True)
            sys.exit(INTERRUPTED)
        except KeyboardInterrupt:
            click.echo("bach: interrupted", err=True)
            sys.exit(INTERRUPTED)
        except Exception as exc:
            _failed(exc)
        sys.exit(status if isinstance(status, int) else OK)


def _failed(exc: Exception) -> NoReturn:
    status = status_of(exc)
    if status != INTERNAL:
        if os.environ.get("BACH_DEBUG") == "1":
            traceback.print_exc()
        fail(str(exc) or type(exc).__name__, status)
    if os.environ.get("BACH_DEBUG") == "1":
        traceback.print_exc()
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "…"
    click.echo(
        f"bach: internal error: {type(exc).__name__}: {text} (BACH_DEBUG=1 shows the traceback)",
        err=True,
    )
    sys.exit(INTERNAL)

"""Running one job on one service: a Python callable or an external program.

A callable takes one JSON-able input and returns one JSON-able output; it may be sync
(run in a thread, so the worker keeps heartbeating) or async. A program gets the input
as one JSON document on stdin and must print one JSON document on stdout; it runs
without a shell. A non-zero exit, unparsable output or an exception is a failure whose
message says what happened (a program's stderr tail included), and ``Outcome.error``
records it: the exception's type and traceback, or the program's exit status and stderr.

What fails for good, without retries: ``bach.Fatal`` or an exception type named in the
service's ``retry.non_retryable``, a program exit status in ``retry.permanent_exit_codes``,
and whatever no retry can change (input or output that is not JSON, a result too large).

A cancelled job (its request was cancelled or failed while it ran) stops: an async
handler at its next await, a program by SIGTERM and, after ``cancel_grace`` seconds,
SIGKILL. A sync handler's thread cannot be stopped; the worker leaves after it and is
replaced (see ``Worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import os
import shutil
import signal
import traceback
from asyncio.subprocess import Process
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bach import Fatal
from bach.core.limits import (
    DEFAULTS,
    ERROR_TEXT,
    Limits,
    clean_text,
    dumps,
    encode_json,
    option,
    parse_json,
    size_text,
)
from bach.core.score import Service
from bach.errors import BachError, ScoreIssue
from bach.plugins import load_object

#: Characters of a program's stderr kept in an error message.
STDERR_TAIL = 2000
#: Bytes read from a program's pipes at a time.
PIPE_CHUNK = 64 * 1024

log = logging.getLogger("bach.program")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    #: JSON of the result when ok, else the error message.
    payload: str
    retryable: bool = True
    #: The attempt overran its timeout and its code may still be running.
    timed_out: bool = False
    #: On failure: ``type``, ``message`` and ``traceback`` or ``stderr`` (capped).
    error: dict[str, Any] = field(default_factory=dict)


def failure(kind: str, message: str, retryable: bool = True, **more: Any) -> Outcome:
    """A failed attempt whose error has this type name and message."""
    return Outcome(False, message, retryable, error={"type": kind, "message": message, **more})


def type_names(exc: BaseException) -> set[str]:
    """The names an exception answers to: its classes' names, plain and qualified."""
    names = set()
    for cls in type(exc).__mro__:
        names |= {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
    return names


class Invoker:
    """Runs jobs for one service."""

    def __init__(self, service: Service, limits: Limits = DEFAULTS) -> None:
        self.service = service
        self.limits = limits
        spec = service.spec
        self._func: Callable[[Any], Any] | None = None
        self._threads = ThreadPoolExecutor(thread_name_prefix=f"bach-{service.name}")
        self._permanent = set(spec.retry.non_retryable)
        if spec.handler is not None:
            self._func = load_object(spec.handler, service.base_dir)
            if not callable(self._func):
                raise TypeError(f"handler {spec.handler!r} is not callable")

    @property
    def blocking(self) -> bool:
        """A sync handler: it runs in a thread that cannot be stopped."""
        return self._func is not None and not inspect.iscoroutinefunction(self._func)

    async def __call__(self, payload: str, timeout: float) -> Outcome:
        try:
            value = json.loads(payload)
        except ValueError as exc:
            return failure("InvalidInput", f"job input is not JSON: {exc}", retryable=False)
        if self._func is not None:
            return await self._call(value, timeout)
        return await self._run_program(payload, timeout)

    async def _call(self, value: Any, timeout: float) -> Outcome:
        assert self._func is not None
        func = self._func
        try:
            if inspect.iscoroutinefunction(func):
                result = await asyncio.wait_for(func(value), timeout)
            else:
                # Our own threads, not the loop's default executor: asyncio.run() joins
                # that at exit, and a stuck handler would then hold the process.
                # In a copy of this context: the handler's log lines carry its job.
                context = contextvars.copy_context()
                call = asyncio.get_running_loop().run_in_executor(
                    self._threads, context.run, func, value
                )
                result = await asyncio.wait_for(call, timeout)
        except TimeoutError:
            out = failure("Timeout", f"timed out after {timeout:g}s")
            return Outcome(False, out.payload, timed_out=True, error=out.error)
        except Exception as exc:
            message = clean_text(f"{type(exc).__name__}: {exc}", ERROR_TEXT)
            trace = "".join(traceback.format_exception(exc))
            return failure(
                type(exc).__name__,
                message,
                retryable=not isinstance(exc, Fatal) and not self._permanent & type_names(exc),
                traceback=clean_text(trace, ERROR_TEXT, keep="tail"),
            )
        limits = self.limits
        try:
            return Outcome(
                True, encode_json(result, "result", limits.result, "result", limits.depth)
            )
        except BachError as exc:  # no retry makes it storable
            return failure(type(exc).__name__, f"{exc.field} {exc.reason}", retryable=False)

    async def _run_program(self, payload: str, timeout: float) -> Outcome:
        spec = self.service.spec
        assert spec.command is not None
        cwd = self.service.base_dir / spec.cwd if spec.cwd else self.service.base_dir
        env = {**os.environ, **spec.env} if spec.env else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            return failure("ProgramNotStarted", f"cannot start {spec.command[0]!r}: {exc.strerror}")
        try:
            out, err = await asyncio.wait_for(self._exchange(proc, payload.encode()), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return failure("Timeout", f"timed out after {timeout:g}s; the program was killed")
        except asyncio.CancelledError:
            await self._stop(proc)
            raise
        tail = clean_text(err.decode(errors="replace").strip(), STDERR_TAIL, keep="tail")
        for line in tail.splitlines()[-20:]:
            log.info("%s: %s", spec.command[0], line)
        if out is None:
            limit = size_text(self.limits.result)
            return failure(
                "ResultTooLarge",
                f"program printed more than {limit}, the most a result may hold "
                f"({option('result')}); it was killed",
                retryable=False,
                stderr=tail,
            )
        if proc.returncode != 0:
            detail = f": {tail}" if tail else " (no stderr)"
            return failure(
                "ProgramExit",
                f"program exited with status {proc.returncode}{detail}",
                retryable=proc.returncode not in spec.retry.permanent_exit_codes,
                exit_status=proc.returncode,
                stderr=tail,
            )
        try:
            result = parse_json(out, "result", self.limits.depth)
        except BachError as exc:
            shown = clean_text(out.decode(errors="replace").strip(), 200)
            detail = f"; stderr: {tail}" if tail else ""
            return failure(
                "InvalidOutput",
                f"program printed something that is not JSON: {shown!r} ({exc.field}: "
                f"{exc.reason}){detail}",
                retryable=False,
                stderr=tail,
            )
        return Outcome(True, dumps(result))

    async def _stop(self, proc: Process) -> None:
        """A cancelled program: SIGTERM, then SIGKILL once its grace runs out."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.service.spec.cancel_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _exchange(self, proc: Process, data: bytes) -> tuple[bytes | None, bytes]:
        """Feed the program its input and read what it prints: stdout up to the result
        limit (None, and the program killed, beyond it), the tail of stderr."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

        async def feed() -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                stdin.write(data)
                await stdin.drain()
            stdin.close()

        async def tail() -> bytes:
            kept = bytearray()
            while chunk := await stderr.read(PIPE_CHUNK):
                kept += chunk
                del kept[: -4 * STDERR_TAIL]
            return bytes(kept)

        feeder = asyncio.create_task(feed())
        errors = asyncio.create_task(tail())
        try:
            chunks: list[bytes] = []
            size = 0
            while chunk := await stdout.read(PIPE_CHUNK):
                size += len(chunk)
                if size > self.limits.result:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    return None, await errors
                chunks.append(chunk)
            await proc.wait()
            return b"".join(chunks), await errors
        finally:
            for task in (feeder, errors):
                task.cancel()
            await asyncio.gather(feeder, errors, return_exceptions=True)


def check_service(service: Service) -> ScoreIssue | None:
    """Why this service cannot run here (handler not importable, program not found), or
    None. Checked at start so a broken score is refused, not retried forever."""
    spec = service.spec

    def issue(field: str, reason: str) -> ScoreIssue:
        return ScoreIssue(service.file, reason, field=field, service=service.name)

    if spec.handler is not None:
        try:
            func = load_object(spec.handler, service.base_dir)
        except BachError as exc:
            return issue("handler", exc.reason)
        except Exception as exc:  # the module itself failed while importing
            return issue("handler", f"importing {spec.handler!r} failed: {exc!r}")
        return None if callable(func) else issue("handler", f"{spec.handler!r} is not callable")
    assert spec.command is not None
    program = spec.command[0]
    cwd = service.base_dir / spec.cwd if spec.cwd else service.base_dir
    found = (cwd / program).exists() if "/" in program else shutil.which(program) is not None
    return None if found else issue("command", f"program {program!r} not found")

"""Running one job on one service: a Python callable or an external program.

A callable takes one JSON-able input and returns one JSON-able output; it may be sync
(run in a thread, so the worker keeps heartbeating) or async. A program gets the input
as one JSON document on stdin and must print one JSON document on stdout; it runs
without a shell. A non-zero exit, unparsable output or an exception is a failure whose
message says what happened (a program's stderr tail included).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bach.core.score import Service
from bach.errors import BachError, ScoreIssue
from bach.plugins import load_object

#: Characters of a program's stderr kept in an error message.
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Outcome:
    ok: bool
    #: JSON of the result when ok, else the error message.
    payload: str
    retryable: bool = True
    #: The attempt overran its timeout and its code may still be running.
    timed_out: bool = False


class Invoker:
    """Runs jobs for one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        spec = service.spec
        self._func: Callable[[Any], Any] | None = None
        self._threads = ThreadPoolExecutor(thread_name_prefix=f"bach-{service.name}")
        if spec.handler is not None:
            self._func = load_object(spec.handler, service.base_dir)
            if not callable(self._func):
                raise TypeError(f"handler {spec.handler!r} is not callable")

    async def __call__(self, payload: str, timeout: float) -> Outcome:
        try:
            value = json.loads(payload)
        except ValueError as exc:
            return Outcome(False, f"job input is not JSON: {exc}", retryable=False)
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
                call = asyncio.get_running_loop().run_in_executor(self._threads, func, value)
                result = await asyncio.wait_for(call, timeout)
        except TimeoutError:
            return Outcome(False, f"timed out after {timeout:g}s", timed_out=True)
        except Exception as exc:
            return Outcome(False, f"{type(exc).__name__}: {exc}")
        try:
            return Outcome(True, json.dumps(result, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            return Outcome(False, f"result is not JSON-able: {exc}", retryable=False)

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
            return Outcome(False, f"cannot start {spec.command[0]!r}: {exc.strerror}")
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload.encode()), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return Outcome(False, f"timed out after {timeout:g}s; the program was killed")
        tail = err.decode(errors="replace")[-STDERR_TAIL:].strip()
        if proc.returncode != 0:
            detail = f": {tail}" if tail else " (no stderr)"
            return Outcome(False, f"program exited with status {proc.returncode}{detail}")
        try:
            result = json.loads(out)
        except ValueError:
            shown = out.decode(errors="replace")[:200].strip()
            detail = f"; stderr: {tail}" if tail else ""
            return Outcome(False, f"program printed something that is not JSON: {shown!r}{detail}")
        return Outcome(True, json.dumps(result, separators=(",", ":")))


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

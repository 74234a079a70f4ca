"""How every Bach process logs: one line per record on stderr, as text or as JSON.

``bach serve`` and ``bach worker`` call ``configure`` once. The workers a ``bach serve``
starts inherit its level and format through ``BACH_LOG_LEVEL`` and ``BACH_LOG_FORMAT``
(``export``), so one system logs one way.

Fields a record carries besides its message (``extra={"request_id": ...}``, or the job
it was emitted in, see ``job_context``) are every JSON line's keys, and in text the
request and task at the end of the line: a handler's own ``logging`` calls can be
traced to the job that made them without passing anything around.

Only the standard library here: a worker imports this on its way to its first job.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: The job whose code is running in this context (a task, or a thread given a copy).
_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "bach_job", default=None
)

#: What every LogRecord has; anything else came from ``extra=`` or from ``job_context``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
#: The keys a JSON line always starts with; an extra field of the same name is dropped.
_BASE = ("time", "level", "logger", "pid", "message")


@contextlib.contextmanager
def job_context(request_id: str, task: str, attempt: int) -> Iterator[None]:
    """Records emitted inside (in this task, or in a thread run in a copy of this
    context) carry ``request_id``, ``task`` and ``attempt``."""
    token = _job.set({"request_id": request_id, "task": task, "attempt": attempt})
    try:
        yield
    finally:
        _job.reset(token)


class JobFilter(logging.Filter):
    """Adds the current job's fields to a record that does not name them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _job.get()
        if found:
            for name, value in found.items():
                if not hasattr(record, name):  # an explicit extra= wins
                    setattr(record, name, value)
        return True


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields: what ``extra=`` and ``job_context`` gave it."""
    return {
        name: value
        for name, value in vars(record).items()
        if name not in _STANDARD and not name.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """``time LEVEL logger[pid]: message request=<id> task=<t>``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for name, shown in (("request_id", "request"), ("task", "task")):
            value = getattr(record, name, None)
            if value is not None:
                line += f" {shown}={value}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, pid, message, then
    every field of the record, and ``exc_info`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name, value in fields_of(record).items():
            out.setdefault(name, value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, default=str, ensure_ascii=False, allow_nan=False)
        except ValueError:  # NaN or infinity in a field: a line must still be JSON
            return json.dumps({k: v if k in _BASE else repr(v) for k, v in out.items()})


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` or above to ``stream`` (stderr) in ``fmt``
    (text or json), each with the fields of the job it was emitted in. Replaces the
    root logger's handlers, so it may be called again (a forked worker does)."""
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    kind = fmt.lower()
    if kind not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if kind == "json" else TextFormatter())
    handler.addFilter(JobFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)


def export(level: str, fmt: str) -> None:
    """Put the level and format in this process's environment, which the processes it
    starts (the fork server, workers) inherit and ``bach worker`` reads."""
    os.environ["BACH_LOG_LEVEL"] = level.upper()
    os.environ["BACH_LOG_FORMAT"] = fmt.lower()

"""What the state machine asks the outside world to do. Plain data; the engine acts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dispatch:
    """Put one attempt of one task on its service's queue."""

    request_id: str
    task: str
    attempt: int
    service: str
    input: Any
    #: Earliest time a worker may take it (later than now for a retry's backoff).
    not_before: float
    timeout: float

    @property
    def job_id(self) -> str:
        return job_id(self.request_id, self.task, self.attempt)


@dataclass(frozen=True)
class Finish:
    """The request completed with this result."""

    request_id: str
    result: Any


@dataclass(frozen=True)
class Fail:
    """The request failed; ``task`` names the task whose failure ended it, if any."""

    request_id: str
    error: str
    task: str | None = None


@dataclass(frozen=True)
class Withdraw:
    """Take this request's queued jobs off their queues (it ended or was cancelled)."""

    request_id: str


Effect = Dispatch | Finish | Fail | Withdraw


def job_id(request_id: str, task: str, attempt: int) -> str:
    """The execution id of one attempt; unique, and the same however often it is sent."""
    return f"{request_id}/{task}/{attempt}"

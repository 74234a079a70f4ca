"""Errors Bach raises. Each one says which field is wrong and why."""

from __future__ import annotations

from dataclasses import dataclass


class BachError(Exception):
    """Something went wrong in Bach."""

    #: HTTP status the API answers with when this error reaches it.
    status = 400

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason

    def to_dict(self) -> dict[str, str]:
        return {"type": type(self).__name__, "field": self.field, "reason": self.reason}


class InvalidJSON(BachError):
    """Text that is not JSON (RFC 8259): a syntax error, NaN or Infinity, bytes that are
    not UTF-8."""

    status = 400


class InvalidInput(BachError):
    """A request or command body that cannot be accepted."""

    status = 422


class TooLarge(BachError):
    """A body, input or result over its size limit."""

    status = 413


class UnreadableRecord(BachError):
    """A stored record this version of Bach cannot read (written by another version, or
    damaged): a fault of the store, not of the request that asks for it."""

    status = 500


class NotFound(BachError):
    """A request, rubric, client or service that does not exist."""

    status = 404


class Conflict(BachError):
    """An operation that the current state does not allow."""

    status = 409


class MappingError(BachError):
    """An input mapping that could not be evaluated against a request."""

    status = 422


class StoreError(BachError):
    """A store URL that cannot be opened."""

    status = 500


@dataclass(frozen=True)
class ScoreIssue:
    """One problem in a score file, located as precisely as we can."""

    file: str
    reason: str
    field: str = ""
    rubric: str = ""
    task: str = ""
    service: str = ""

    def __str__(self) -> str:
        where = [self.file]
        if self.service:
            where.append(f"service {self.service!r}")
        if self.rubric:
            where.append(f"rubric {self.rubric!r}")
        if self.task:
            where.append(f"task {self.task!r}")
        if self.field:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}"


class ScoreError(BachError):
    """A score that failed validation; holds every issue found, not only the first."""

    def __init__(self, issues: list[ScoreIssue]) -> None:
        self.issues = issues
        first = issues[0] if issues else ScoreIssue("<score>", "invalid score")
        super().__init__(first.field, "\n".join(str(i) for i in issues))

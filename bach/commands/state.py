"""The state of a command run: a tree of checkpointed calls, as seed 004 shows it.

A run is stored as one request record (``plan_id`` ``"command"``) whose body is this tree
as JSON, so every backend keeps it with the same atomic, versioned commit as requests.
Pure data: no I/O here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bach.core.limits import ERROR_TEXT, clean_text

#: ``plan_id`` of the request records that hold command runs.
PLAN_ID = "command"


class Status(StrEnum):
    CREATED = "CREATED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    #: A client cancelled the run (a run only; a call cut short by it is FAILED).
    CANCELLED = "CANCELLED"


ENDED = (Status.COMPLETE, Status.FAILED, Status.CANCELLED)


@dataclass
class Node:
    """One call: a command (or a score service) with its request and, once ended, its
    response or error. ``name`` is its key among its siblings: the alias, else the
    command's name."""

    command: str
    name: str
    request: Any
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: Status = Status.CREATED
    response: Any = None
    error: dict[str, str] | None = None
    attempts: int = 0
    #: The score service this call went to, when it is a service call.
    service: str | None = None
    #: The job of the service call's current attempt.
    job: str | None = None
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status.value,
            "command": self.command,
            "name": self.name,
            "request": self.request,
            "response": self.response,
            "children": {name: child.to_dict() for name, child in self.children.items()},
        }
        if self.error is not None:
            out["error"] = self.error
        if self.attempts:
            out["attempts"] = self.attempts
        if self.service is not None:
            out["service"] = self.service
            out["job"] = self.job
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        return cls(
            command=data["command"],
            name=data["name"],
            request=data.get("request"),
            id=data["id"],
            status=Status(data["status"]),
            response=data.get("response"),
            error=data.get("error"),
            attempts=data.get("attempts", 0),
            service=data.get("service"),
            job=data.get("job"),
            children={k: cls.from_dict(v) for k, v in data.get("children", {}).items()},
        )

    def find(self, path: list[str]) -> Node | None:
        node: Node | None = self
        for name in path:
            node = node.children.get(name) if node is not None else None
        return node


@dataclass
class Run:
    """A submitted run: its top-level calls are the root's children."""

    id: str
    key: str
    root: Node
    status: Status = Status.PENDING
    #: The engine executing it and until when it may (pushed out while it lives).
    owner: str | None = None
    lease_until: float = 0.0
    error: dict[str, str] | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def view(self) -> dict[str, Any]:
        """Seed 004's CommandState: id, status and the children by name."""
        out: dict[str, Any] = {
            "id": self.id,
            "key": self.key,
            "status": self.status.value,
            "children": {name: node.to_dict() for name, node in self.root.children.items()},
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_body(self) -> dict[str, Any]:
        return {
            "root": self.root.to_dict(),
            "owner": self.owner,
            "lease_until": self.lease_until,
            "error": self.error,
        }

    @classmethod
    def from_body(cls, rid: str, key: str, status: str, body: dict[str, Any]) -> Run:
        return cls(
            id=rid,
            key=key,
            root=Node.from_dict(body["root"]),
            status=Status(status),
            owner=body.get("owner"),
            lease_until=body.get("lease_until", 0.0),
            error=body.get("error"),
        )

    def merge_ended_from(self, stored: Run) -> None:
        """Take service calls another engine ended (it applied their results) into this,
        the owner's copy: the only writes a run gets from outside its owner."""

        def walk(mine: Node, theirs: Node) -> None:
            for name, other in theirs.children.items():
                own = mine.children.get(name)
                if own is None:
                    continue
                if own.service is None:
                    walk(own, other)
                elif not own.ended and (other.ended or other.attempts > own.attempts):
                    own.status, own.response, own.error = other.status, other.response, other.error
                    own.attempts, own.job = other.attempts, other.job

        walk(self.root, stored.root)


def error_of(exc: BaseException) -> dict[str, str]:
    message = clean_text(str(exc) or type(exc).__name__, ERROR_TEXT)
    return {"type": type(exc).__name__, "message": message}

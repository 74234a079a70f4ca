"""Rubric compilation to the bitwise form of seed 000.

Each task owns one bit (``value``) and carries the mask of the bits it needs first
(``req_state``). A task is ready when ``done & req_state == req_state`` and its bit is
neither done nor dispatched. Masks are Python ints, so a rubric may have any number of
tasks.

A compiled rubric is a ``Plan``. Plans are plain data: they serialise to JSON and back
(``to_dict``/``from_dict``) so a request carries its own plan and any engine can advance
it without the score that produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from bach.core.mapping import Template
from bach.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from bach.core.score import Policy, RubricSpec, Service


@dataclass(frozen=True)
class Task:
    """One task of a compiled rubric."""

    name: str
    service: str
    after: tuple[str, ...]
    value: int
    req_state: int
    #: Bits of every task upstream of this one, direct or not.
    ancestors: int
    #: The input mapping, or None for the default: the request input for a task with
    #: nothing before it, the one upstream result for a task with one, and a mapping of
    #: task name to result for a task with several.
    input: Template | None
    output: str | None
    retries: int
    backoff: float
    max_backoff: float
    timeout: float


@dataclass(frozen=True)
class Plan:
    """A compiled rubric (or an ad-hoc ``todo`` chain)."""

    name: str
    tasks: tuple[Task, ...]
    result: Template | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def full(self) -> int:
        """The state in which every task is done."""
        mask = 0
        for task in self.tasks:
            mask |= task.value
        return mask

    @cached_property
    def by_name(self) -> dict[str, Task]:
        return {task.name: task for task in self.tasks}

    @cached_property
    def sinks(self) -> tuple[Task, ...]:
        needed = 0
        for task in self.tasks:
            needed |= task.req_state
        return tuple(t for t in self.tasks if not t.value & needed)

    def ready(self, done: int, dispatched: int) -> list[Task]:
        """Tasks whose requirements are done and which are neither done nor dispatched."""
        busy = done | dispatched
        return [t for t in self.tasks if t.req_state & done == t.req_state and not t.value & busy]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tasks": [
                {
                    "name": t.name,
                    "service": t.service,
                    "after": list(t.after),
                    **({"input": t.input.source} if t.input is not None else {}),
                    "output": t.output,
                    "retries": t.retries,
                    "backoff": t.backoff,
                    "max_backoff": t.max_backoff,
                    "timeout": t.timeout,
                }
                for t in self.tasks
            ],
            "result": None if self.result is None else self.result.source,
            "params": dict(self.params),
        }

    @cached_property
    def digest(self) -> str:
        """A content hash: equal plans share one stored copy."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        specs = [
            _TaskSource(
                name=t["name"],
                service=t["service"],
                after=tuple(t["after"]),
                input=Template(t["input"]) if "input" in t else None,
                output=t.get("output"),
                policy=(t["retries"], t["backoff"], t["max_backoff"], t["timeout"]),
            )
            for t in data["tasks"]
        ]
        result = data.get("result")
        return _build(
            data["name"],
            specs,
            None if result is None else Template(result),
            data.get("params") or {},
        )


@dataclass(frozen=True)
class _TaskSource:
    name: str
    service: str
    after: tuple[str, ...]
    input: Template | None
    output: str | None
    policy: tuple[int, float, float, float]


def _build(
    name: str, sources: Sequence[_TaskSource], result: Template | None, params: Mapping[str, Any]
) -> Plan:
    order = topological_order({s.name: list(s.after) for s in sources})
    by_name = {s.name: s for s in sources}
    bits = {task: 1 << i for i, task in enumerate(order)}
    upstream = ancestors({s.name: list(s.after) for s in sources})
    tasks = []
    for task_name in order:
        s = by_name[task_name]
        req = 0
        for dep in s.after:
            req |= bits[dep]
        anc = 0
        for dep in upstream[task_name]:
            anc |= bits[dep]
        retries, backoff, max_backoff, timeout = s.policy
        tasks.append(
            Task(
                task_name,
                s.service,
                s.after,
                bits[task_name],
                req,
                anc,
                s.input,
                s.output,
                retries,
                backoff,
                max_backoff,
                timeout,
            )
        )
    return Plan(name, tuple(tasks), result, dict(params))


def _policy_tuple(policy: Policy) -> tuple[int, float, float, float]:
    return (policy.retries, policy.backoff, policy.max_backoff, policy.timeout)


def compile_rubric(name: str, spec: RubricSpec, services: Mapping[str, Service]) -> Plan:
    """Compile a validated rubric; the score loader has checked names and cycles."""
    sources = [
        _TaskSource(
            name=task_name,
            service=task.service,
            after=tuple(task.after),
            input=Template(task.input) if "input" in task.model_fields_set else None,
            output=task.output,
            policy=_policy_tuple(services[task.service].spec),
        )
        for task_name, task in spec.tasks.items()
    ]
    result = None if spec.result is None else Template(spec.result)
    return _build(name, sources, result, {})


def todo_names(todo: Sequence[str]) -> list[str]:
    """Task names for an ordered todo list: a repeated service gets a suffix (A, B, A#2)."""
    seen: dict[str, int] = {}
    names = []
    for service in todo:
        seen[service] = seen.get(service, 0) + 1
        names.append(service if seen[service] == 1 else f"{service}#{seen[service]}")
    return names


def compile_todo(todo: Sequence[str], services: Mapping[str, Service]) -> Plan:
    """Compile an ad-hoc ordered list of services to a chain: each task gets the previous
    task's result (the first gets the request input)."""
    if not todo:
        raise InvalidInput("todo", "the todo list is empty; name at least one service")
    unknown = [s for s in todo if s not in services]
    if unknown:
        known = ", ".join(sorted(services)) or "none"
        raise NotFound("todo", f"unknown service {unknown[0]!r} (known: {known})")
    names = todo_names(todo)
    sources = [
        _TaskSource(
            name=task_name,
            service=service,
            after=(names[i - 1],) if i else (),
            input=None,
            output=None,
            policy=_policy_tuple(services[service].spec),
        )
        for i, (task_name, service) in enumerate(zip(names, todo, strict=True))
    ]
    return _build("todo:" + ",".join(todo), sources, None, {})


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle in ``task -> tasks it comes after`` as a path ``[a, b, ..., a]``, or []."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and dep in graph:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def topological_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Tasks ordered so each comes after what it needs, keeping declaration order
    where the graph allows (Kahn's algorithm, stable)."""
    remaining = {node: set(deps) for node, deps in graph.items()}
    order: list[str] = []
    while remaining:
        ready = [node for node, deps in remaining.items() if not deps]
        if not ready:
            raise ValueError("cycle in rubric")
        for node in ready:
            del remaining[node]
            order.append(node)
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def ancestors(graph: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """Every task's transitive upstream set (the graph must be acyclic)."""
    memo: dict[str, set[str]] = {}

    def up(node: str) -> set[str]:
        if node not in memo:
            result: set[str] = set()
            for dep in graph.get(node, ()):
                result.add(dep)
                result |= up(dep)
            memo[node] = result
        return memo[node]

    for node in graph:
        up(node)
    return memo

"""Rubric compilation to the bitwise form of seed 000.

Each task owns one bit (``value``) and carries the mask of the bits it needs first
(``req_state``). A task is ready when ``done & req_state == req_state`` and its bit is
neither done nor dispatched. Masks are Python ints, so a rubric may have any number of
tasks. Bits follow the topological order, so that order is part of what a store holds
(request bitmasks, plan digests) and must not change.

Compiling and stepping cost time linear in the number of tasks and dependencies: a
request may hold thousands of tasks, and a step only looks at the dependents of the task
that completed (``Plan.dependents``).

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
    #: Position in the plan's order; the task's bit is ``1 << index``.
    index: int
    value: int
    req_state: int
    #: The input mapping, or None for the default: the request input for a task with
    #: nothing before it, the one upstream result for a task with one, and a mapping of
    #: task name to result for a task with several.
    input: Template | None
    output: str | None
    retries: int
    backoff: float
    max_backoff: float
    timeout: float
    #: Each retry waits ``factor`` times longer than the one before (up to max_backoff)
    backoff_factor: float = 2.0
    #: Up to this share of each wait is taken off, by a hash of the job: retries of many
    #: requests that failed together spread out instead of arriving together.
    jitter: float = 0.0


#: Policy fields a plan's JSON holds only when they differ from these (so that plans
#: written before they existed keep their digest).
_POLICY_DEFAULTS = {"backoff_factor": 2.0, "jitter": 0.0}


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
        return (1 << len(self.tasks)) - 1

    @cached_property
    def by_name(self) -> dict[str, Task]:
        return {task.name: task for task in self.tasks}

    @cached_property
    def dependents(self) -> tuple[tuple[Task, ...], ...]:
        """By task index: the tasks that come directly after it, in plan order."""
        found: list[list[Task]] = [[] for _ in self.tasks]
        by_name = self.by_name
        for task in self.tasks:
            for dep in dict.fromkeys(task.after):
                found[by_name[dep].index].append(task)
        return tuple(tuple(tasks) for tasks in found)

    @cached_property
    def sinks(self) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if not self.dependents[t.index])

    def ready(self, done: int, dispatched: int) -> list[Task]:
        """Tasks whose requirements are done and which are neither done nor dispatched."""
        return _ready(self.tasks, done, done | dispatched)

    def ready_after(self, task: Task, done: int, dispatched: int) -> list[Task]:
        """``ready`` once ``task`` is done, given that everything that was ready before is
        done or dispatched: only its dependents can have become ready."""
        return _ready(self.dependents[task.index], done, done | dispatched)

    def upstream(self, task: Task) -> tuple[Task, ...]:
        """Every task upstream of this one, direct or not, in plan order. Worked out on
        first use and kept: only tasks with an input mapping need it."""
        cache = self._upstream
        found = cache.get(task.index)
        if found is None:
            by_name = self.by_name
            seen: set[int] = set()
            stack = [task]
            while stack:
                for dep in stack.pop().after:
                    up = by_name[dep]
                    if up.index not in seen:
                        seen.add(up.index)
                        stack.append(up)
            found = cache[task.index] = tuple(self.tasks[i] for i in sorted(seen))
        return found

    @cached_property
    def _upstream(self) -> dict[int, tuple[Task, ...]]:
        return {}

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
                    **{
                        k: getattr(t, k)
                        for k, default in _POLICY_DEFAULTS.items()
                        if getattr(t, k) != default
                    },
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
                policy=(
                    t["retries"],
                    t["backoff"],
                    t["max_backoff"],
                    t["timeout"],
                    *(t.get(k, default) for k, default in _POLICY_DEFAULTS.items()),
                ),
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


def _ready(candidates: Sequence[Task], done: int, busy: int) -> list[Task]:
    return [t for t in candidates if t.req_state & done == t.req_state and not t.value & busy]


@dataclass(frozen=True)
class _TaskSource:
    name: str
    service: str
    after: tuple[str, ...]
    input: Template | None
    output: str | None
    #: retries, backoff, max_backoff, timeout[, backoff_factor, jitter]
    policy: tuple[float, ...]


def _build(
    name: str, sources: Sequence[_TaskSource], result: Template | None, params: Mapping[str, Any]
) -> Plan:
    order = topological_order({s.name: s.after for s in sources})
    by_name = {s.name: s for s in sources}
    position = {task: i for i, task in enumerate(order)}
    tasks = []
    for i, task_name in enumerate(order):
        s = by_name[task_name]
        req = 0
        for dep in s.after:
            req |= 1 << position[dep]
        retries, backoff, max_backoff, timeout, *more = s.policy
        factor, jitter = (*more, *_POLICY_DEFAULTS.values())[:2]
        tasks.append(
            Task(
                task_name,
                s.service,
                s.after,
                i,
                1 << i,
                req,
                s.input,
                s.output,
                int(retries),
                backoff,
                max_backoff,
                timeout,
                factor,
                jitter,
            )
        )
    return Plan(name, tuple(tasks), result, dict(params))


def _policy_tuple(policy: Policy) -> tuple[float, ...]:
    return (
        policy.retries,
        policy.backoff,
        policy.max_backoff,
        policy.timeout,
        policy.backoff_factor,
        policy.jitter,
    )


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
    """A cycle in ``task -> tasks it comes after`` as a path ``[a, b, ..., a]``, or [].
    Depth first in declaration order, without recursion (a chain may be long)."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        path = [root]
        pending = [iter(graph[root])]
        while pending:
            for dep in pending[-1]:
                if state.get(dep) == 1:
                    return [*path[path.index(dep) :], dep]
                if dep not in state and dep in graph:
                    state[dep] = 1
                    path.append(dep)
                    pending.append(iter(graph[dep]))
                    break
            else:
                state[path.pop()] = 2
                pending.pop()
    return []


def topological_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Tasks ordered so each comes after what it needs, keeping declaration order
    where the graph allows: stable layered Kahn. Layer k holds, in declaration order,
    the tasks whose last requirement is in layer k - 1 (linear, bar sorting each layer)."""
    declared = {node: i for i, node in enumerate(graph)}
    waiting: dict[str, int] = {}
    after: dict[str, list[str]] = {node: [] for node in graph}
    for node, deps in graph.items():
        unique = dict.fromkeys(deps)
        for dep in unique:
            if dep not in after:  # never satisfied: refused like a cycle
                raise ValueError("cycle in rubric")
            after[dep].append(node)
        waiting[node] = len(unique)
    layer = [node for node in graph if not waiting[node]]
    order: list[str] = []
    while layer:
        order += layer
        unblocked = []
        for node in layer:
            for later in after[node]:
                waiting[later] -= 1
                if not waiting[later]:
                    unblocked.append(later)
        unblocked.sort(key=declared.__getitem__)
        layer = unblocked
    if len(order) != len(graph):
        raise ValueError("cycle in rubric")
    return order


def ancestors(graph: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """Every task's transitive upstream set (the graph must be acyclic). Its size is
    quadratic in a long chain's length: ``Plan.upstream`` is the lazy form."""
    memo: dict[str, set[str]] = {}
    for node in topological_order(graph):
        found: set[str] = set()
        for dep in graph[node]:
            found.add(dep)
            found |= memo[dep]
        memo[node] = found
    return {node: memo[node] for node in graph}

"""Scores: the files that declare services, rubrics and client setups.

A score is YAML or JSON::

    services:
      A: {handler: "arith:add_two"}            # a Python callable, sync or async
      B: {command: [python3, double.py]}       # a program: JSON on stdin, JSON on stdout
    rubrics:
      add_then_double:
        tasks:
          add:    {service: A, input: "${input}"}
          double: {service: B, after: [add], input: "${tasks.add}"}
    clients:
      X: {rubric: add_then_double, params: {watermark: ACME}}

Loading validates everything and reports every problem with its file, rubric, task and
field (see ``ScoreError``). ``load_scores`` returns a ``Score`` whose rubrics are compiled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bach.core import rubric as rubric_mod
from bach.core.mapping import ROOTS, Template, unclosed
from bach.errors import MappingError, ScoreError, ScoreIssue


class Policy(BaseModel):
    """How a service's jobs are retried and timed out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retries: int = Field(
        3, ge=0, description="extra attempts after the first fails (lost attempts count)"
    )
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry")
    backoff_factor: float = Field(2.0, ge=1, description="each retry waits this much longer")
    max_backoff: float = Field(60.0, ge=0, description="upper bound of one retry delay")
    jitter: float = Field(
        0.0, ge=0, le=1, description="up to this share of each delay is taken off at random"
    )
    timeout: float = Field(300.0, gt=0, description="seconds one attempt may run")


class RetryRules(BaseModel):
    """Failures that no retry can fix: the job fails at its first attempt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    non_retryable: list[str] = Field(
        default_factory=list,
        description="exception type names (a handler raising one, or a subclass, fails "
        "for good); e.g. ValueError or mypkg.errors.BadInput",
    )
    permanent_exit_codes: list[int] = Field(
        default_factory=list, description="a program's exit statuses that fail for good"
    )


class ServiceSpec(Policy):
    """How to reach one service, as written in a score."""

    handler: str | None = Field(None, description="'module:function' of a Python callable")
    command: list[str] | None = Field(None, description="argv of a program; JSON in and out")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    instances: int = Field(1, ge=0, description="worker processes started at boot")
    min_instances: int | None = Field(
        None, ge=0, description="instances kept when idle (default: instances)"
    )
    max_instances: int | None = Field(
        None, ge=1, description="instances a backlog may scale up to (default: min_instances)"
    )
    idle_timeout: float = Field(
        60.0, gt=0, description="seconds without work before scaling down to min_instances"
    )
    concurrency: int = Field(1, ge=1, description="jobs one instance runs at once")
    retry: RetryRules = Field(default_factory=RetryRules)
    cancel_grace: float = Field(
        5.0, ge=0, description="seconds a cancelled program gets after SIGTERM before SIGKILL"
    )

    @property
    def low(self) -> int:
        return self.instances if self.min_instances is None else self.min_instances

    @property
    def high(self) -> int:
        return max(self.low, 1) if self.max_instances is None else self.max_instances

    @model_validator(mode="after")
    def _one_kind(self) -> ServiceSpec:
        if (self.handler is None) == (self.command is None):
            raise ValueError("give exactly one of 'handler' or 'command'")
        if self.handler is not None:
            module, _, func = self.handler.partition(":")
            if not module or not func:
                raise ValueError(f"handler {self.handler!r} is not of the form 'module:function'")
        if self.command is not None and not self.command:
            raise ValueError("command must name a program")
        if self.max_instances is not None and self.max_instances < self.low:
            raise ValueError(
                f"max_instances ({self.max_instances}) is below min_instances ({self.low})"
            )
        return self

    def policy(self) -> Policy:
        return Policy(
            retries=self.retries,
            backoff=self.backoff,
            backoff_factor=self.backoff_factor,
            max_backoff=self.max_backoff,
            jitter=self.jitter,
            timeout=self.timeout,
        )


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str
    after: list[str] = Field(default_factory=list)
    input: Any = None
    output: str | None = None


class RubricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, TaskSpec] = Field(min_length=1)
    result: Any = None
    description: str = ""


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rubric: str
    params: dict[str, Any] = Field(default_factory=dict)


class ScoreFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    rubrics: dict[str, RubricSpec] = Field(default_factory=dict)
    clients: dict[str, ClientSpec] = Field(default_factory=dict)
    plugins: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _client_shorthand(cls, data: Any) -> Any:
        # `clients: {X: rubric_name}` is short for `{X: {rubric: rubric_name}}`.
        if isinstance(data, dict) and isinstance(data.get("clients"), dict):
            data = dict(data)
            data["clients"] = {
                k: {"rubric": v} if isinstance(v, str) else v for k, v in data["clients"].items()
            }
        return data


@dataclass(frozen=True)
class Service:
    """A validated service, with the folder its score came from."""

    name: str
    spec: ServiceSpec
    base_dir: Path
    file: str


@dataclass(frozen=True)
class Client:
    name: str
    rubric: str
    params: dict[str, Any]


@dataclass
class Score:
    """Everything the loaded score files declare, validated and compiled."""

    services: dict[str, Service] = field(default_factory=dict)
    rubrics: dict[str, rubric_mod.Plan] = field(default_factory=dict)
    clients: dict[str, Client] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# -- reading files ---------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate name {key!r} (first at line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate name {key!r}")
        out[key] = value
    return out


def read_score_file(path: Path) -> Any:
    """Parse one score file; raises ScoreError for unreadable or malformed text."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScoreError([ScoreIssue(str(path), f"cannot read: {exc.strerror}")]) from None
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return yaml.load(text, Loader=_StrictLoader)
    except (ValueError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ScoreError([ScoreIssue(str(path), f"not valid YAML/JSON: {reason}")]) from None


# -- validation ------------------------------------------------------------------------


def _pydantic_issues(file: str, error: ValidationError) -> list[ScoreIssue]:
    issues = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        where: dict[str, str] = {}
        if len(loc) >= 2 and loc[0] == "services":
            where["service"] = loc[1]
            loc = loc[2:]
        elif len(loc) >= 2 and loc[0] == "rubrics":
            where["rubric"] = loc[1]
            loc = loc[2:]
            if len(loc) >= 2 and loc[0] == "tasks":
                where["task"] = loc[1]
                loc = loc[2:]
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        issues.append(ScoreIssue(file, reason, field=".".join(loc), **where))
    return issues


def _task_issues(
    file: str, rubric: str, spec: RubricSpec, services: Iterable[str]
) -> tuple[list[ScoreIssue], dict[str, str]]:
    """Name checks for every task; also returns the output keys and their tasks."""
    known_services = sorted(services)
    issues: list[ScoreIssue] = []
    outputs: dict[str, str] = {}
    for name, task in spec.tasks.items():
        found: list[tuple[str, str]] = []
        if task.service not in known_services:
            known = ", ".join(known_services) or "none"
            found.append(("service", f"unknown service {task.service!r} (known: {known})"))
        for dep in task.after:
            if dep == name:
                found.append(("after", "a task cannot come after itself"))
            elif dep not in spec.tasks:
                found.append(("after", f"unknown task {dep!r} (known: {', '.join(spec.tasks)})"))
        if task.output in ROOTS:
            found.append(("output", f"output key {task.output!r} is reserved"))
        elif task.output in outputs:
            owner = outputs[task.output]
            found.append(
                ("output", f"output key {task.output!r} is already used by task {owner!r}")
            )
        elif task.output is not None:
            outputs[task.output] = name
        issues += [ScoreIssue(file, why, field=fld, rubric=rubric, task=name) for fld, why in found]
    return issues, outputs


def _rubric_issues(
    file: str, name: str, spec: RubricSpec, services: Iterable[str]
) -> list[ScoreIssue]:
    issues, outputs = _task_issues(file, name, spec, services)
    if issues:
        return issues
    graph = {t: s.after for t, s in spec.tasks.items()}
    cycle = rubric_mod.find_cycle(graph)
    if cycle:
        reason = "cycle: " + " -> ".join(cycle)
        return [ScoreIssue(file, reason, field="after", rubric=name, task=cycle[0])]
    upstream = rubric_mod.ancestors(graph)
    for task_name, task in spec.tasks.items():
        if "input" in task.model_fields_set:
            issues += _mapping_issues(
                file, name, task_name, "input", task.input, upstream[task_name], outputs
            )
    if spec.result is not None:
        issues += _mapping_issues(file, name, "", "result", spec.result, set(spec.tasks), outputs)
    return issues


def _mapping_issues(
    file: str,
    rubric: str,
    task: str,
    fld: str,
    source: Any,
    upstream: set[str],
    outputs: dict[str, str],
) -> list[ScoreIssue]:
    issues = [
        ScoreIssue(file, exc.reason, field=exc.field, rubric=rubric, task=task)
        for exc in unclosed(source, fld)
    ]
    try:
        template = Template(source)
    except MappingError as exc:
        return [*issues, ScoreIssue(file, exc.reason, field=fld, rubric=rubric, task=task)]
    for ref in sorted(template.refs(), key=lambda r: (r.root, r.name or "")):
        reads = ref.name if ref.root == "tasks" else outputs.get(ref.root)
        if ref.root not in ROOTS and ref.root not in outputs:
            reason = (
                f"reads {ref.root!r}, which is neither input, tasks, params nor an "
                "output key of this rubric"
            )
        elif reads is not None and reads not in upstream:
            reason = f"reads task {reads!r}, which is not upstream of this task"
            if fld == "result":
                reason = f"reads task {reads!r}, which is not in this rubric"
        else:
            continue
        issues.append(ScoreIssue(file, reason, field=fld, rubric=rubric, task=task))
    return issues


def _client_issues(
    file: str, clients: dict[str, ClientSpec], rubrics: Iterable[str]
) -> list[ScoreIssue]:
    known = sorted(rubrics)
    return [
        ScoreIssue(
            file,
            f"client {name!r}: unknown rubric {c.rubric!r} (known: {', '.join(known) or 'none'})",
            field="rubric",
        )
        for name, c in clients.items()
        if c.rubric not in known
    ]


def _required_params(spec: RubricSpec) -> dict[str, str]:
    """The params a rubric's mappings cannot do without, each with where it first reads it
    (a mapping that does not compile is reported on its own)."""
    readers = [
        (t.input, f"task {name!r}")
        for name, t in spec.tasks.items()
        if "input" in t.model_fields_set
    ]
    readers.append((spec.result, "its result"))
    needed: dict[str, str] = {}
    for source, where in readers:
        try:
            params = Template(source).required_params()
        except MappingError:
            continue
        for param in sorted(params):
            needed.setdefault(param, where)
    return needed


def _params_issues(
    file: str, clients: dict[str, ClientSpec], rubrics: dict[str, RubricSpec]
) -> list[ScoreIssue]:
    """Clients without a param their rubric reads: every request of theirs would fail."""
    issues = []
    for name, client in clients.items():
        spec = rubrics.get(client.rubric)  # an unknown rubric is reported already
        if spec is None:
            continue
        defined = ", ".join(sorted(client.params)) or "none"
        issues += [
            ScoreIssue(
                file,
                f"client {name!r} does not define param {param!r}, which rubric "
                f"{client.rubric!r} reads (${{params.{param}}} in {where}; defined: {defined})",
                field="params",
            )
            for param, where in _required_params(spec).items()
            if param not in client.params
        ]
    return issues


def _parse_files(paths: Sequence[str | Path]) -> tuple[list[_Parsed], list[ScoreIssue]]:
    issues: list[ScoreIssue] = []
    parsed: list[_Parsed] = []
    owners: dict[tuple[str, str], str] = {}
    for raw in paths:
        path = Path(raw)
        data = read_score_file(path)
        if not isinstance(data, dict | None):
            reason = "a score must be a mapping with services, rubrics and clients"
            issues.append(ScoreIssue(str(path), reason))
            continue
        try:
            sf = ScoreFile.model_validate(data or {})
        except ValidationError as exc:
            issues += _pydantic_issues(str(path), exc)
            continue
        for kind in ("services", "rubrics", "clients"):
            for name in getattr(sf, kind):
                first = owners.setdefault((kind, name), str(path))
                if first != str(path):
                    reason = f"{kind[:-1]} {name!r} is already declared in {first}"
                    issues.append(ScoreIssue(str(path), reason))
        parsed.append(_Parsed(str(path), path.resolve().parent, sf))
    return parsed, issues


@dataclass(frozen=True)
class _Parsed:
    file: str
    base: Path
    score: ScoreFile


def load_scores(paths: Sequence[str | Path]) -> Score:
    """Read, validate and compile score files; raise ScoreError listing every problem."""
    parsed, issues = _parse_files(paths)
    score = Score(files=[p.file for p in parsed])
    for p in parsed:
        for name, service in p.score.services.items():
            score.services[name] = Service(name, service, p.base, p.file)
        score.plugins += [name for name in p.score.plugins if name not in score.plugins]
    all_rubrics = {name for p in parsed for name in p.score.rubrics}
    for p in parsed:
        for name, spec in p.score.rubrics.items():
            found = _rubric_issues(p.file, name, spec, score.services)
            issues += found
            if not found:
                score.rubrics[name] = rubric_mod.compile_rubric(name, spec, score.services)
        issues += _client_issues(p.file, p.score.clients, all_rubrics)
        for name, c in p.score.clients.items():
            score.clients[name] = Client(name, c.rubric, c.params)
    specs = {name: spec for p in parsed for name, spec in p.score.rubrics.items()}
    for p in parsed:  # a client may use a rubric of another file
        issues += _params_issues(p.file, p.score.clients, specs)
    if issues:
        raise ScoreError(issues)
    return score

"""Input mappings: how a task's input is built from the request and earlier results.

A mapping is any JSON value. Strings of the form ``${expr}`` are JMESPath expressions
evaluated against the request's context::

    {"input": <request input>, "tasks": {<task name>: <its result>, ...},
     "params": <client params>, <output key>: <that task's result>, ...}

Everything else passes through as a literal. An expression that finds nothing (null) is
an error naming the expression, so a typo in a request field fails the request at once
instead of feeding ``null`` to a service; write ``${?expr}`` where null is acceptable.
A literal string that starts with ``${`` is written ``$${...}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from bach.errors import MappingError

_EXPR = re.compile(r"\A\$\{(\??)(.*)\}\Z", re.DOTALL)

#: Names a mapping may read at its root besides output keys.
ROOTS = ("input", "tasks", "params")


@dataclass(frozen=True)
class Ref:
    """A name an expression reads at the root of its context (``tasks.A`` gives root
    ``tasks`` and name ``A``)."""

    root: str
    name: str | None = None


@dataclass(frozen=True)
class _Expr:
    source: str
    optional: bool
    compiled: Any

    def render(self, context: Mapping[str, Any], where: str) -> Any:
        try:
            value = self.compiled.search(context)
        except JMESPathError as exc:
            raise MappingError(where, f"expression {self.source!r} failed: {exc}") from None
        if value is None and not self.optional:
            raise MappingError(where, f"expression {self.source!r} found nothing in the request")
        return value


class Template:
    """A compiled mapping. Raises MappingError at construction for a bad expression."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._tree = _compile(source)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def render(self, context: Mapping[str, Any], where: str = "input") -> Any:
        return _render(self._tree, context, where)

    def refs(self) -> set[Ref]:
        return {ref for expr in _exprs(self._tree) for ref in _root_refs(expr.compiled.parsed)}

    def required_params(self) -> set[str]:
        """The params a request fails without: ``${params.NAME...}`` (not ``${?...}``)
        finds nothing when ``NAME`` is missing. Only whole-expression chains count, as an
        expression like ``${params.a || input.b}`` may find something all the same."""
        needed = (_required_param(e.compiled.parsed) for e in _exprs(self._tree) if not e.optional)
        return {name for name in needed if name is not None}


def unclosed(source: Any, where: str = "input") -> list[MappingError]:
    """Strings that open ``${`` but are not one whole ``${expr}``, most likely typos: as
    literals they would reach a service as text. The score loader refuses them; a
    Template still takes them as literals, so a plan stored before this check still loads."""
    if isinstance(source, dict):
        return [e for key, value in source.items() for e in unclosed(value, f"{where}.{key}")]
    if isinstance(source, list):
        return [e for i, value in enumerate(source) for e in unclosed(value, f"{where}[{i}]")]
    if not isinstance(source, str) or not source.startswith("${") or _EXPR.match(source):
        return []
    hint = "(or write '$${' for a literal '${')"
    if "}" not in source:
        reason = f"the '${{' of {source!r} is not closed: end the expression with '}}' {hint}"
    else:
        reason = (
            f"{source!r} has text after the '}}' that closes its '${{': a mapping string is "
            f"either one whole ${{expression}} or a literal {hint}"
        )
    return [MappingError(where, reason)]


def _compile(source: Any) -> Any:
    if isinstance(source, str):
        if source.startswith("$${"):
            return source[1:]
        match = _EXPR.match(source)
        if match is None:
            return source
        optional, text = match.group(1) == "?", match.group(2).strip()
        try:
            return _Expr(text, optional, jmespath.compile(text))
        except JMESPathError as exc:
            reason = str(exc).splitlines()[0]
            raise MappingError("input", f"bad expression {text!r}: {reason}") from None
    if isinstance(source, dict):
        return {key: _compile(value) for key, value in source.items()}
    if isinstance(source, list):
        return [_compile(value) for value in source]
    return source


def _render(node: Any, context: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, _Expr):
        return node.render(context, where)
    if isinstance(node, dict):
        return {key: _render(value, context, f"{where}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [_render(value, context, f"{where}[{i}]") for i, value in enumerate(node)]
    return node


def _exprs(node: Any) -> Iterator[_Expr]:
    if isinstance(node, _Expr):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _exprs(value)


# Node types whose first child is evaluated against the current object and the rest
# against what the first produced.
_CHAINS = {
    "subexpression",
    "index_expression",
    "pipe",
    "projection",
    "value_projection",
    "filter_projection",
    "flatten",
}
# Node types whose children are all evaluated against the current object.
_BRANCHES = {
    "or_expression",
    "and_expression",
    "not_expression",
    "comparator",
    "multi_select_dict",
    "multi_select_list",
    "key_val_pair",
    "function_expression",
}


def _root_refs(node: dict[str, Any]) -> set[Ref]:
    """The names an expression reads from the root context."""
    kind = node["type"]
    children: list[dict[str, Any]] = node.get("children", [])
    if kind == "field":
        return {Ref(node["value"])}
    if kind in _CHAINS and children:
        head = children[0]
        if head["type"] == "field" and head["value"] == "tasks" and len(children) > 1:
            name = _leading_field(children[1])
            if name is not None:
                return {Ref("tasks", name)}
        return _root_refs(head)
    if kind in _BRANCHES:
        return {ref for child in children for ref in _root_refs(child)}
    return set()


# Chains in which a null head gives a null result (a pipe's right side may not).
_NULL_CHAINS = _CHAINS - {"pipe"}


def _required_param(node: dict[str, Any]) -> str | None:
    """``NAME`` when the expression is a chain that starts ``params.NAME``."""
    children: list[dict[str, Any]] = node.get("children", [])
    if node["type"] not in _NULL_CHAINS or not children:
        return None
    head = children[0]
    if head["type"] == "field" and head["value"] == "params" and len(children) > 1:
        return _leading_field(children[1])
    return _required_param(head)


def _leading_field(node: dict[str, Any]) -> str | None:
    if node["type"] == "field":
        return str(node["value"])
    if node["type"] in _CHAINS and node.get("children"):
        return _leading_field(node["children"][0])
    return None

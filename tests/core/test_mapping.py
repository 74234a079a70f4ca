from __future__ import annotations

import pytest

from bach.core.mapping import Ref, Template
from bach.errors import MappingError

CTX = {"input": {"x": 1, "items": [1, 2]}, "tasks": {"A": {"n": 3}}, "params": {"w": "acme"}}


def test_literals_pass_through_and_expressions_are_evaluated() -> None:
    t = Template({"a": "${input.x}", "b": "plain", "c": [1, "${tasks.A.n}"], "d": None})
    assert t.render(CTX) == {"a": 1, "b": "plain", "c": [1, 3], "d": None}


def test_whole_value_expression_keeps_its_type() -> None:
    assert Template("${input.items}").render(CTX) == [1, 2]
    assert Template("${params.w}").render(CTX) == "acme"


def test_missing_value_is_an_error_naming_the_expression_and_place() -> None:
    with pytest.raises(MappingError) as err:
        Template({"size": "${input.size}"}).render(CTX)
    assert err.value.field == "input.size"
    assert "input.size" in err.value.reason and "found nothing" in err.value.reason


def test_optional_expression_allows_null() -> None:
    assert Template("${?input.size}").render(CTX) is None


def test_escaped_dollar_is_a_literal() -> None:
    assert Template("$${input}").render(CTX) == "${input}"


def test_bad_syntax_is_reported_at_compile_time() -> None:
    with pytest.raises(MappingError, match="bad expression"):
        Template("${input.[}")


def test_refs_find_root_names_and_task_names() -> None:
    t = Template(
        {
            "a": "${tasks.A.n}",
            "b": "${input.x || params.w}",
            "c": '${length(tasks."B#2")}',
            "d": "${adjusted.size}",
        }
    )
    assert t.refs() == {
        Ref("tasks", "A"),
        Ref("input"),
        Ref("params"),
        Ref("tasks", "B#2"),
        Ref("adjusted"),
    }


def test_refs_ignore_names_inside_projections() -> None:
    assert Template("${input.items[?x > `1`].y}").refs() == {Ref("input")}

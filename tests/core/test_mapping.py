from __future__ import annotations

import pytest

from bach.core.mapping import Ref, Template, unclosed
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


def test_a_string_that_opens_an_expression_without_closing_it_is_found_with_its_place() -> None:
    found = unclosed({"a": ["ok", "${input.x"], "b": "${input.x}", "c": "$${x", "d": 5})
    assert [e.field for e in found] == ["input.a[1]"]
    assert "'${input.x'" in found[0].reason and "is not closed" in found[0].reason


def test_text_after_an_expression_is_found_too() -> None:
    found = unclosed("${input.x} px", "result")
    assert [e.field for e in found] == ["result"]
    assert "text after the '}'" in found[0].reason


def test_an_unclosed_string_still_compiles_as_a_literal_so_stored_plans_load() -> None:
    assert Template("${input.x").render(CTX) == "${input.x"


def test_required_params_are_those_without_which_the_expression_finds_nothing() -> None:
    t = Template(
        {
            "w": "${params.watermark}",
            "s": ["${params.size.width}", "${params.items[0]}"],
            "o": "${?params.optional}",
            "f": "${params.fallback || input.x}",
            "i": "${input.x}",
            "all": "${params}",
        }
    )
    assert t.required_params() == {"watermark", "size", "items"}

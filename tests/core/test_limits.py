"""What Bach accepts: strict JSON, nesting, Unicode, sizes and tracking keys."""

from __future__ import annotations

import json

import pytest

from bach.core.limits import (
    Limits,
    check_key,
    check_value,
    clean_text,
    dumps,
    encode_json,
    option,
    parse_json,
    size_text,
)
from bach.errors import InvalidInput, InvalidJSON, TooLarge


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('{"input": NaN}', "input", "NaN is not JSON"),
        ('{"input": [1, -Infinity]}', "input[1]", "-Infinity is not JSON"),
        ('{"input": {"x": 1e400}}', "input.x", "too large for a double"),
        ('{"a b": {"c": Infinity}}', '["a b"].c', "Infinity"),
        ("{bad", "body", "not valid JSON"),
        ("", "body", "not valid JSON"),
    ],
)
def test_what_is_not_json_is_refused_with_its_place(text: str, field: str, words: str) -> None:
    with pytest.raises(InvalidJSON) as err:
        parse_json(text)
    assert err.value.status == 400
    assert err.value.field == field
    assert words in err.value.reason


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(InvalidJSON) as err:
        parse_json(b'{"a": "\xff"}')
    assert "not UTF-8" in err.value.reason and "0xff" in err.value.reason


def test_a_lone_surrogate_is_refused_and_a_pair_is_kept() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_json('{"input": {"s": ["ok", "\\ud800"]}}')
    assert err.value.field == "input.s[1]"
    assert "lone surrogate" in err.value.reason
    with pytest.raises(InvalidInput) as err:
        parse_json('{"\\udfff": 1}')
    assert "object key" in err.value.reason
    assert parse_json('"\\ud83d\\ude00"') == "\U0001f600"


def test_nesting_is_limited() -> None:
    assert parse_json(deep(64)) is not None
    with pytest.raises(InvalidInput) as err:
        parse_json(deep(65))
    assert "more than 64 levels" in err.value.reason
    assert parse_json(deep(10), depth=10) == [[[[[[[[[[]]]]]]]]]]
    # A body's fields count from themselves: its input may nest 64 levels too.
    assert parse_json('{"input": ' + deep(64) + "}", fields=True) is not None
    with pytest.raises(InvalidInput):
        parse_json('{"input": ' + deep(65) + "}", fields=True)
    # Deeper than Python's own parser goes: still a 422 with the reason, not a crash.
    with pytest.raises(InvalidInput) as err:
        parse_json(deep(100_000))
    assert "levels deep" in err.value.reason


def test_huge_integers_round_trip_and_absurd_ones_are_refused() -> None:
    big = 10**300 + 7
    assert parse_json(str(big)) == big
    with pytest.raises(InvalidInput) as err:
        parse_json("1" * 5000)
    assert "digits" in err.value.reason


def test_edge_floats_round_trip() -> None:
    for value in (5e-324, 1.7976931348623157e308, -0.0, 0.1):
        assert parse_json(dumps(value)) == value


def test_check_value_walks_python_values() -> None:
    check_value({"a": [1, "x", None, True, 2.5]}, "input")
    with pytest.raises(InvalidJSON) as err:
        check_value({"a": [float("nan")]}, "result")
    assert err.value.field == "result.a[0]"


def test_encode_json_refuses_what_cannot_be_stored() -> None:
    assert encode_json({"a": [1, "é"]}, "result", 100, "result", 64) == '{"a":[1,"é"]}'
    with pytest.raises(TooLarge) as big:
        encode_json("x" * 2000, "result", 1024, "result", 64)
    assert big.value.status == 413
    assert "at most 1 KiB" in big.value.reason and "--max-result" in big.value.reason
    with pytest.raises(InvalidInput) as odd:
        encode_json({"a": object()}, "result", 1024, "result", 64)
    assert "not JSON-able" in odd.value.reason
    with pytest.raises(InvalidInput) as lone:
        encode_json(["\udc80"], "result", 1024, "result", 64)
    assert lone.value.field == "result[0]"
    with pytest.raises(InvalidJSON):
        encode_json(float("-inf"), "result", 1024, "result", 64)


def test_keys() -> None:
    assert check_key("order-17.a_b~c:d@e+f=g,h") == "order-17.a_b~c:d@e+f=g,h"
    assert check_key(42) == "42"
    assert check_key(42.0) == "42"  # JSON's 42.0 is the integer 42
    for bad, words in [
        (False, "not a boolean"),
        (1.5, "not float"),
        (-1, "from 0 to"),
        (2**63, "from 0 to"),
        ("", "must not be empty"),
        ("a/b", "'/' at position 1"),
        ("-a", "'-' at position 0"),
        ("é", "'é' at position 0"),
        ("x" * 129, "129 characters long; at most 128"),
    ]:
        with pytest.raises(InvalidInput) as err:
            check_key(bad)
        assert err.value.field == "key"
        assert words.removeprefix("not ") in err.value.reason, err.value.reason


def test_limits_and_their_options() -> None:
    assert option("body") == "--max-body (BACH_MAX_BODY)"
    assert size_text(2 * 1024 * 1024) == "2 MiB"
    assert size_text(512 * 1024) == "512 KiB"
    assert size_text(100) == "100 bytes"
    with pytest.raises(ValueError):
        Limits(depth=1000)
    with pytest.raises(ValueError):
        Limits(tasks=0)


def test_clean_text_makes_any_text_storable() -> None:
    text = clean_text("bad \udc80 byte", 100)
    assert json.loads(json.dumps(text, ensure_ascii=False).encode("utf-8")) == text
    assert "\\udc80" in text
    assert clean_text("abcdef", 4) == "abc…"
    assert clean_text("abcdef", 4, keep="tail") == "…def"

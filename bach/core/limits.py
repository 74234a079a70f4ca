"""What Bach accepts: JSON values within limits, and tracking keys.

Every value that enters Bach passes through here: an HTTP body, a request's input, a
handler's result, a program's output, a command's request and response. What passes
can be stored and read back equal; what does not is refused with the field and the
reason, before anything is stored.

- JSON is RFC 8259: ``NaN`` and ``Infinity`` are not JSON, nor is a number too large for
  a double (Python's parser would read ``1e400`` as infinity), nor text that is not UTF-8.
- Strings must be valid Unicode: a lone surrogate (``"\\ud800"``) cannot be encoded in
  UTF-8, so no store could keep it.
- Arrays and objects nest at most ``Limits.depth`` levels (every reader, ours and the
  clients', is recursive somewhere).
- Sizes are bytes of the compact UTF-8 JSON text.

Pure: no I/O. ``Limits`` holds the defaults; ``bach serve`` sets them from its options.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from bach.errors import InvalidInput, InvalidJSON, TooLarge

MiB = 1024 * 1024
#: Most levels of nesting a limit may allow: well inside the recursion limits of the
#: JSON encoders and decoders that read a value after us.
DEPTH_CEILING = 256


@dataclass(frozen=True)
class Limits:
    """Limits on what clients and services hand to Bach (see the README's table)."""

    #: Bytes of one HTTP request body.
    body: int = 2 * MiB
    #: Bytes of a request's input, or of one command's request.
    input: int = 1 * MiB
    #: Bytes of one job's result (a program's output), or of a command's response.
    result: int = 1 * MiB
    #: Characters of a tracking key.
    key: int = 128
    #: Tasks in one ad-hoc (``todo``) request, commands in one run.
    tasks: int = 1000
    #: Levels of nesting of arrays and objects in any value.
    depth: int = 64
    #: Bytes of one request as stored: its input and every job's input and result.
    request: int = 16 * MiB

    def __post_init__(self) -> None:
        for name in ("body", "input", "result", "key", "tasks", "depth", "request"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.depth > DEPTH_CEILING:
            raise ValueError(f"limit depth must be at most {DEPTH_CEILING}")


#: The defaults (what ``bach serve`` uses without its --max-* options).
DEFAULTS = Limits()

#: The ``bach serve`` option of each limit, named in errors so a user knows what to raise.
OPTIONS = {
    "body": "--max-body",
    "input": "--max-input",
    "result": "--max-result",
    "key": "--max-key",
    "tasks": "--max-tasks",
    "depth": "--max-depth",
    "request": "--max-request",
}


def option(limit: str) -> str:
    """``--max-body (BACH_MAX_BODY)``."""
    flag = OPTIONS[limit]
    return f"{flag} (BACH_{flag[2:].upper().replace('-', '_')})"


def size_text(n: int) -> str:
    """Bytes for people: 2 MiB, 512 KiB, 100 bytes."""
    if n >= MiB and (n * 10) % MiB == 0:
        return f"{n / MiB:g} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


# -- JSON text -------------------------------------------------------------------------


def dumps(value: Any) -> str:
    """Compact JSON text; refuses NaN and Infinity."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _NotJSON:
    """Where the parser met something that is not JSON; reported with its path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _constant(name: str) -> _NotJSON:
    return _NotJSON(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _float(text: str) -> float | _NotJSON:
    value = float(text)
    if math.isinf(value):
        return _NotJSON(f"the number {text[:40]} is too large for a double")
    return value


#: A ``\\uD800``-``\\uDFFF`` escape: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(
    data: bytes | str, where: str = "body", depth: int = Limits.depth, *, fields: bool = False
) -> Any:
    """Parse JSON text strictly (see the module docstring). Raises InvalidJSON (400) for
    text that is not JSON and InvalidInput (422) for a value Bach cannot keep; both name
    the place, e.g. ``input.items[3]``. With ``fields``, ``depth`` counts from the values
    of the top object (a body's ``input``), not from the object."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})"
            raise InvalidJSON(where, reason) from None
    else:
        text = data
    constants: list[bool] = []

    def constant(name: str) -> _NotJSON:
        constants.append(True)
        return _constant(name)

    def number(text: str) -> float | _NotJSON:
        value = _float(text)
        if isinstance(value, _NotJSON):
            constants.append(True)
        return value

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(
            where, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidInput(where, f"nested more than {depth} levels deep") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        digits = re.search(r"\((\d+) digits\)", str(exc))
        limit = digits.group(1) if digits else "4300"
        raise InvalidInput(where, f"a number has more than {limit} digits") from None
    strings = bool(_SURROGATE_ESCAPE.search(text))
    check_value(value, where, depth, strings=strings, top=-1 if fields else 0)
    return value


def check_value(
    value: Any, where: str, depth: int = Limits.depth, *, strings: bool = True, top: int = 0
) -> None:
    """Refuse a value nested deeper than ``depth``, holding a string that is not valid
    Unicode (checked when ``strings``), or a float that JSON cannot write. Raises
    InvalidJSON or InvalidInput naming the place."""
    found = _first_problem(value, depth, strings, top)
    if found is not None:
        path, reason, error = found
        raise error(_path_text(where, path), reason)


_Path = tuple[Any, Any] | None  # (parent path, key or index): a linked list, cheap to extend


def _bad_string(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_Problem = tuple[_Path, str, type[InvalidJSON] | type[InvalidInput]]
_UNICODE = "not valid Unicode (it holds a lone surrogate)"
_WALKED = (dict, list, tuple, str, float, _NotJSON)


def _first_problem(value: Any, depth: int, strings: bool, top: int) -> _Problem | None:
    stack: list[tuple[Any, int, _Path]] = [(value, top, None)]
    while stack:
        node, level, path = stack.pop()
        if isinstance(node, dict | list | tuple):
            if level >= depth:
                return path, f"nested more than {depth} levels deep", InvalidInput
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if strings and isinstance(key, str) and _bad_string(key):
                    return (path, key), f"the object key is {_UNICODE}", InvalidInput
                if isinstance(child, _WALKED):
                    stack.append((child, level + 1, (path, key)))
        else:
            found = _leaf_problem(node, strings)
            if found is not None:
                return path, *found
    return None


def _leaf_problem(
    node: Any, strings: bool
) -> tuple[str, type[InvalidJSON] | type[InvalidInput]] | None:
    if isinstance(node, str):
        if strings and _bad_string(node):
            return f"the string is {_UNICODE}", InvalidInput
    elif isinstance(node, float):
        if not math.isfinite(node):
            return f"{node} is not JSON (RFC 8259 has no NaN or Infinity)", InvalidJSON
    elif isinstance(node, _NotJSON):
        return node.reason, InvalidJSON
    return None


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _path_text(where: str, path: _Path) -> str:
    parts: list[Any] = []
    while path is not None:
        path, step = path
        parts.append(step)
    text = "" if where == "body" else where
    for step in reversed(parts):
        if isinstance(step, int):
            text += f"[{step}]"
        elif isinstance(step, str) and _NAME.match(step):
            text += f".{step}" if text else step
        else:
            text += f"[{json.dumps(str(step))}]"
        if len(text) > 200:
            return text[:200] + "…"
    return text or where


def encode_json(value: Any, where: str, limit: int, limit_name: str, depth: int) -> str:
    """The JSON text of a value, checked: nesting, Unicode, NaN, JSON types and size.
    What a handler returns or a command is given goes through here before it is stored.
    Raises InvalidInput, InvalidJSON or TooLarge naming ``where``."""
    check_value(value, where, depth, strings=False)
    try:
        text = dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(where, f"is not JSON-able: {exc}") from None
    try:
        check_size(text, where, limit, limit_name)
    except UnicodeEncodeError:
        check_value(value, where, depth, strings=True)  # names the string
        raise
    return text


def check_size(text: str, where: str, limit: int, limit_name: str) -> None:
    """TooLarge when ``text`` is over ``limit`` bytes of UTF-8."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > limit:
        raise TooLarge(
            where,
            f"is {size_text(size)} of JSON; at most {size_text(limit)} is allowed"
            f" ({option(limit_name)})",
        )


def read_result(payload: str, limits: Limits = DEFAULTS) -> Any:
    """A service's result, from the JSON text a worker reported: checked again where it
    is applied, since a worker of another version may not have. Raises TooLarge,
    InvalidJSON or InvalidInput."""
    check_size(payload, "result", limits.result, "result")
    return parse_json(payload, "result", limits.depth)


# -- tracking keys ---------------------------------------------------------------------

#: What a tracking key may contain: letters and digits (ASCII), and ``- . _ ~ : @ + = ,``,
#: starting with a letter or a digit. Every such key is one path segment of a URL as it
#: is, so ``/api/requests/{key}`` reaches it.
KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._~:@+=,-]*"
KEY_RULE = "letters, digits and - . _ ~ : @ + = , (starting with a letter or digit)"
_KEY = re.compile(KEY_PATTERN + r"\Z")
#: The largest integer key (a signed 64-bit integer, what most clients' JSON can hold).
MAX_INT_KEY = 2**63 - 1
_KEY_CHAR = re.compile(r"[A-Za-z0-9._~:@+=,-]")


def check_key(key: object, max_length: int = Limits.key, field: str = "key") -> str:
    """A tracking key as text (an integer key is its decimal digits), or InvalidInput.
    JSON does not tell 7 from 7.0, so a whole float is the integer it writes."""
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, str | int):
        kind = "a boolean" if isinstance(key, bool) else type(key).__name__
        raise InvalidInput(field, f"a key is a string or an integer, not {kind}")
    if isinstance(key, int) and not 0 <= key <= MAX_INT_KEY:
        raise InvalidInput(
            field, f"an integer key is from 0 to {MAX_INT_KEY}; give a larger one as a string"
        )
    text = str(key)
    if not text:
        raise InvalidInput(field, "the key must not be empty")
    if len(text) > max_length:
        raise InvalidInput(
            field,
            f"the key is {len(text)} characters long; at most {max_length} are allowed"
            f" ({option('key')})",
        )
    if _KEY.match(text) is None:
        if not _KEY_CHAR.match(text[0]) or text[0] in "._~:@+=,-":
            where = f"{text[0]!r} at position 0"
        else:
            bad = next(i for i, c in enumerate(text) if not _KEY_CHAR.match(c))
            where = f"{text[bad]!r} at position {bad}"
        raise InvalidInput(field, f"the key has {where}; a key is {KEY_RULE}")
    return text


# -- text from outside -----------------------------------------------------------------

#: Characters of an error message (a handler's exception, a command's) kept on record.
ERROR_TEXT = 16_000


def clean_text(text: str, limit: int | None = None, keep: str = "head") -> str:
    """Text that can be stored: lone surrogates written as ``\\udXXX``, at most ``limit``
    characters (the head or the tail kept, with a mark where it was cut)."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if limit is None or len(text) <= limit:
        return text
    if keep == "tail":
        return "…" + text[-(limit - 1) :]
    return text[: limit - 1] + "…"

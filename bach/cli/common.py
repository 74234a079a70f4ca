"""What the ``bach`` commands share: options that also come from ``BACH_*`` variables,
the types of their values (durations, sizes), and the checks of input and keys that run
before anything is sent."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, ParamSpec, TypeVar

import click

from bach import exits

P = ParamSpec("P")
R = TypeVar("R")


def env_option(*names: str, env: str, **kwargs: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option(*names, envvar=env, show_envvar=True, **kwargs)


score_option = env_option(
    "--score",
    "scores",
    env="BACH_SCORE",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="score file (YAML or JSON); repeat for several",
)
store_option = env_option(
    "--store",
    env="BACH_STORE",
    default=None,
    help="store URL: sqlite:///path (default sqlite:///.bach/bach.db), "
    "memory://, redis://host:port/db",
)
server_option = env_option(
    "--server",
    env="BACH_SERVER",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="URL of a running `bach serve`",
)
token_option = env_option(
    "--token", env="BACH_TOKEN", default=None, help="bearer token the API requires"
)
plugin_option = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    envvar="BACH_PLUGINS",
    help="load a plugin module (module or module:attr) that is not installed; repeat for several",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print the raw JSON")
log_level_option = env_option(
    "--log-level",
    env="BACH_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
)
log_format_option = env_option(
    "--log-format",
    env="BACH_LOG_FORMAT",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="log lines on stderr: text, or one JSON object per line",
)
STATUSES = ["PENDING", "RUNNING", "COMPLETE", "FAILED", "CANCELLED"]


def run_loop(main: Coroutine[Any, Any, R]) -> R:
    """Run the system's event loop: uvloop where it is installed (about half the cost
    per store round trip), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class Duration(click.ParamType[float]):
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` as seconds."""

    name = "duration"
    UNITS: ClassVar[dict[str, int]] = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:], None)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a duration (like 90s, 15m, 12h or 7d)", param, ctx)
        if not seconds > 0 or seconds == float("inf"):  # NaN and inf are not durations
            self.fail(f"{value!r} must be a finite number more than zero", param, ctx)
        return seconds


class Size(click.ParamType[int]):
    """Bytes: ``1048576``, ``512k``, ``2m``, ``1MiB``, ``1g`` (k, m, g are powers of 1024)."""

    name = "size"
    UNITS: ClassVar[dict[str, int]] = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    _FORM = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            number, unit = float(value), ""
        else:
            match = self._FORM.fullmatch(str(value).strip())
            if match is None:
                self.fail(f"{value!r} is not a size (like 1048576, 512k, 2m or 1MiB)", param, ctx)
            number, unit = float(match.group(1)), match.group(2).lower()
        size = int(number * self.UNITS[unit])
        if size < 1:
            self.fail(f"{value!r} must be at least 1 byte", param, ctx)
        return size


def limit_option(limit: str, kind: str, help: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A ``--max-*`` option of ``bach serve`` or ``bach worker``; None: Bach's default."""
    from bach.core.limits import DEFAULTS, DEPTH_CEILING, OPTIONS, size_text

    default = getattr(DEFAULTS, limit)
    kind_type: click.ParamType[int]
    if kind == "size":
        shown, kind_type = size_text(default), Size()
    else:
        top = DEPTH_CEILING if limit == "depth" else None
        shown, kind_type = str(default), click.IntRange(min=1, max=top)
    env = "BACH_" + OPTIONS[limit][2:].upper().replace("-", "_")
    return env_option(
        OPTIONS[limit], f"max_{limit}", env=env, default=None, type=kind_type,
        help=f"{help} (default {shown})",
    )  # fmt: skip


def limits_of(**given: int | None) -> Any:
    """A Limits of the --max-* options given, Bach's defaults for the others."""
    from bach.core.limits import Limits

    try:
        return Limits(**{name: value for name, value in given.items() if value is not None})
    except ValueError as exc:
        exits.fail(str(exc))


def parse_input(
    given: str | None, text: str | None, option: str = "--input", text_option: str = "--input-text"
) -> Any:
    """The value of ``--input JSON`` (strict JSON) or ``--input-text TEXT`` (a string);
    ``-`` reads stdin for either."""
    from bach.core.limits import DEPTH_CEILING, parse_json
    from bach.errors import BachError

    if given is not None and text is not None:
        exits.fail(f"give {option} or {text_option}, not both")
    if text is not None:
        return sys.stdin.read() if text == "-" else text
    if given is None:
        return None
    data: str | bytes = sys.stdin.buffer.read() if given == "-" else given
    try:  # the server applies its own --max-depth; here only what no server takes
        return parse_json(data, option, DEPTH_CEILING)
    except BachError as exc:
        hint = f" (for a string, use {text_option})" if "not valid JSON" in exc.reason else ""
        exits.fail(f"{option}: {exc.reason}{hint}")


def checked_key(key: str | None, what: str) -> str | None:
    """A tracking key (or request id) checked against the key grammar before it is sent."""
    from bach.core.limits import check_key
    from bach.errors import BachError

    if key is None:
        return None
    try:
        return check_key(key, max_length=sys.maxsize, field=what)
    except BachError as exc:
        exits.fail(str(exc))


def exit_for(status: str, wait: bool) -> None:
    """Exit 1 for a request or run that failed or was cancelled, or that had not ended
    when --wait ran out; 0 otherwise."""
    if status in ("FAILED", "CANCELLED") or (wait and status != "COMPLETE"):
        sys.exit(exits.FAILED)


def _stacked(*decorators: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def wrap(func: Callable[..., None]) -> Callable[..., None]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return wrap


def lookup_options(what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options of a command that shows one thing by id or key: REF, --wait and so on."""
    return _stacked(
        click.argument("ref", metavar="ID_OR_KEY"),
        click.option("--wait", is_flag=True, help=f"wait for the {what} to end"),
        click.option("--timeout", default=300.0, show_default=True),
        server_option,
        token_option,
        json_option,
    )


#: The options of a command that acts on one thing by id or key (cancel, retry).
ref_options = _stacked(
    click.argument("ref", metavar="ID_OR_KEY"), server_option, token_option, json_option
)
#: The options of a command that lists things, newest first.
list_options = _stacked(
    click.option("--status", type=click.Choice(STATUSES)),
    click.option("--limit", default=20, show_default=True),
    server_option,
    token_option,
    json_option,
)

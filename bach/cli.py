"""The ``bach`` command: run a system (serve, worker) and talk to one (submit, get, ...).

Every option can also come from a ``BACH_*`` environment variable, shown in ``--help``.
Errors are one line on stderr and an exit status of ``bach.exits`` (0 done, 1 the request
failed, 2 bad usage or input, 3 the server or store cannot be reached, 4 internal error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ClassVar, NoReturn, ParamSpec, TypeVar

import click

from bach import exits
from bach.client import Client, ClientError

P = ParamSpec("P")
R = TypeVar("R")


def _option(*names: str, env: str, **kwargs: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option(*names, envvar=env, show_envvar=True, **kwargs)


score_option = _option(
    "--score",
    "scores",
    env="BACH_SCORE",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="score file (YAML or JSON); repeat for several",
)
store_option = _option(
    "--store",
    env="BACH_STORE",
    default=None,
    help="store URL: sqlite:///path (default sqlite:///.bach/bach.db), "
    "memory://, redis://host:port/db",
)
server_option = _option(
    "--server",
    env="BACH_SERVER",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="URL of a running `bach serve`",
)
token_option = _option(
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


def _limit_option(limit: str, kind: str, help: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
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
    return _option(
        OPTIONS[limit], f"max_{limit}", env=env, default=None, type=kind_type,
        help=f"{help} (default {shown})",
    )  # fmt: skip


def _limits(**given: int | None) -> Any:
    """A Limits of the --max-* options given, Bach's defaults for the others."""
    from bach.core.limits import Limits

    try:
        return Limits(**{name: value for name, value in given.items() if value is not None})
    except ValueError as exc:
        exits.fail(str(exc))


@click.group(cls=exits.Main)
@click.version_option(package_name="bach")
def main() -> None:
    """Bach: drive requests through pipelines of independent services."""


def _check(score: Any, check: Callable[[Any], None]) -> None:
    from bach.errors import ScoreError

    try:
        check(score)
    except ScoreError as exc:
        _score_issues(exc)


def _score_issues(exc: Any) -> NoReturn:
    for issue in exc.issues:
        click.echo(f"bach: invalid score: {issue}", err=True)
    sys.exit(exits.USAGE)


def _not_text(files: tuple[str, ...]) -> None:
    """The score file that is not UTF-8 text, named, with where it stops being text."""
    for file in files:
        with contextlib.suppress(OSError):
            data = Path(file).read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                click.echo(
                    f"bach: invalid score: {file}: not UTF-8 text (byte {exc.start} is"
                    f" {data[exc.start]:#04x}); a score is YAML or JSON in UTF-8",
                    err=True,
                )
                sys.exit(exits.USAGE)


def _load(scores: tuple[str, ...], check: bool = False) -> Any:
    """Load score files; with ``check``, also make sure every service can run here."""
    from bach.core.score import load_scores
    from bach.errors import ScoreError
    from bach.runtime.boot import check_score

    try:
        score = load_scores(scores)
        if check:
            check_score(score)
        return score
    except ScoreError as exc:
        _score_issues(exc)
    except UnicodeDecodeError:  # the loader reads text; a binary or Latin-1 file is not
        _not_text(scores)
        raise


@main.command()
@score_option
@store_option
@_option(
    "--host",
    env="BACH_HOST",
    default="127.0.0.1",
    show_default=True,
    help="address to listen on; beyond loopback it needs --token (or --insecure)",
)
@_option(
    "--port",
    env="BACH_PORT",
    default=8080,
    show_default=True,
    type=int,
    help="0 picks a free port (printed at start)",
)
@token_option
@_option(
    "--insecure",
    env="BACH_INSECURE",
    is_flag=True,
    help="listen beyond loopback without a token: anyone who can reach the port can submit,"
    " cancel and read everything",
)
@_option(
    "--no-workers",
    "no_workers",
    env="BACH_NO_WORKERS",
    is_flag=True,
    help="run the engine and API only; workers run elsewhere",
)
@_option(
    "--grace",
    env="BACH_GRACE",
    default=10.0,
    show_default=True,
    type=float,
    help="seconds workers get to finish their jobs when stopping",
)
@_option(
    "--retain",
    env="BACH_RETAIN",
    default=None,
    type=Duration(),
    help="forget ended requests this long after they end (e.g. 7d); default keep all",
)
@_option(
    "--max-instances",
    env="BACH_MAX_INSTANCES",
    default=None,
    type=click.IntRange(min=1),
    help="cap on worker instances over all services; default each service's max only",
)
@_option(
    "--fork-server/--no-fork-server",
    env="BACH_FORK_SERVER",
    default=True,
    show_default=True,
    help="start workers by forking a process that has Bach imported (milliseconds, not"
    " half a second); off: each worker is a new Python process",
)
@_limit_option("body", "size", "bytes of one HTTP request body")
@_limit_option("input", "size", "bytes of a request's input or a command's request")
@_limit_option("result", "size", "bytes of one job's result or a command's response")
@_limit_option("key", "count", "characters of a tracking key")
@_limit_option("tasks", "count", "tasks in one todo request, commands in one run")
@_limit_option("depth", "count", "levels of nesting in any JSON value")
@_limit_option("request", "size", "bytes of a request as stored: its input, jobs and results")
@plugin_option
@_option("--log-level", env="BACH_LOG_LEVEL", default="INFO", show_default=True)
def serve(
    scores: tuple[str, ...],
    store: str | None,
    host: str,
    port: int,
    token: str | None,
    insecure: bool,
    no_workers: bool,
    grace: float,
    retain: float | None,
    max_instances: int | None,
    fork_server: bool,
    plugins: tuple[str, ...],
    log_level: str,
    **limits: int | None,
) -> None:
    """Start the system: engine, HTTP API and one worker process per service."""
    from bach.runtime.boot import check_score, load_plugins, log_plugins, setup_logging
    from bach.runtime.server import ServeOptions, check_exposure, listen, serve

    check_exposure(host, token, insecure)  # before anything starts or logs
    sock = listen(host, port)
    setup_logging(log_level)
    score = _load(scores)
    registry, found = load_plugins(score, plugins)
    log_plugins(found)
    _check(score, check_score)
    options = ServeOptions(
        store=store,
        host=host,
        port=port,
        token=token,
        workers=not no_workers,
        grace=grace,
        retain=retain,
        max_instances=max_instances,
        plugins=plugins,
        fork_server=fork_server,
        limits=_limits(**{name[4:]: value for name, value in limits.items()}),
        insecure=insecure,
    )
    run_loop(serve(score, options, registry, sock))


@main.command()
@score_option
@_option("--service", env="BACH_SERVICE", required=True, help="the service to serve")
@store_option
@_option(
    "--concurrency",
    env="BACH_CONCURRENCY",
    default=None,
    type=int,
    help="jobs run at once (default: the service's concurrency in the score)",
)
@_option("--grace", env="BACH_GRACE", default=10.0, show_default=True, type=float)
@_option(
    "--lease",
    env="BACH_LEASE",
    default=15.0,
    show_default=True,
    type=float,
    help="seconds a job stays leased without a heartbeat before it goes back to its queue",
)
@_limit_option("result", "size", "bytes of one job's result")
@_limit_option("depth", "count", "levels of nesting in a result")
@plugin_option
@click.option("--parent-pid", type=int, default=None, hidden=True)
@click.option("--ready-fd", type=int, default=None, hidden=True)
@_option("--log-level", env="BACH_LOG_LEVEL", default="INFO", show_default=True)
def worker(
    scores: tuple[str, ...],
    service: str,
    store: str | None,
    concurrency: int | None,
    grace: float,
    lease: float,
    plugins: tuple[str, ...],
    parent_pid: int | None,
    ready_fd: int | None,
    log_level: str,
    max_result: int | None,
    max_depth: int | None,
) -> None:
    """Serve one service: take its jobs from the store, run them, report back."""
    from bach.runtime.boot import run_worker, setup_logging

    setup_logging(log_level)
    limits = _limits(result=max_result, depth=max_depth)
    score = _load(scores)
    status = run_loop(
        run_worker(
            score,
            service,
            store,
            parent_pid=parent_pid,
            concurrency=concurrency,
            grace=grace,
            lease=lease,
            plugins=plugins,
            ready_fd=ready_fd,
            limits=limits,
        )
    )
    sys.stdout.flush()
    # A handler thread that overran its timeout cannot be joined; do not wait for it.
    os._exit(status)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check score files; print every problem with its file, rubric, task and field."""
    score = _load(files)
    click.echo(
        f"ok: {len(score.services)} services, {len(score.rubrics)} rubrics, "
        f"{len(score.clients)} clients"
    )


def _parse_input(
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


def _key(key: str | None, what: str) -> str | None:
    """A tracking key (or request id) checked against the key grammar before it is sent."""
    from bach.core.limits import check_key
    from bach.errors import BachError

    if key is None:
        return None
    try:
        return check_key(key, max_length=sys.maxsize, field=what)
    except BachError as exc:
        exits.fail(str(exc))


def _ended(status: str, wait: bool) -> None:
    """Exit 1 for a request or run that failed or was cancelled, or that had not ended
    when --wait ran out; 0 otherwise."""
    if status in ("FAILED", "CANCELLED") or (wait and status != "COMPLETE"):
        sys.exit(exits.FAILED)


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _show(request: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(request, indent=2))
        return
    click.echo(f"request {request['id']} (key {request['key']}): {request['status']}")
    if request["status"] == "COMPLETE":
        click.echo(f"result: {json.dumps(request['result'])}")
    if request.get("error"):
        click.echo(f"error: {request['error']['message']}")
    for name, job in request["jobs"].items():
        line = (
            f"  {name:<12} {job['status']:<9} input={json.dumps(job['input'])}"
            f" result={json.dumps(job['result'])} attempts={job['attempts']}"
        )
        if job.get("error") and job["status"] != "COMPLETE":
            line += f" error={job['error']}"
        click.echo(line)
    failed = [job for job in request["jobs"].values() if job["status"] == "FAILED"]
    for job in failed:
        error = (job.get("history") or [{}])[-1].get("error") or {}
        detail = error.get("traceback") or error.get("stderr")
        if detail:
            click.echo(f"last attempt of {job['service']} ({error.get('type', 'error')}):")
            click.echo("  " + detail.rstrip().replace("\n", "\n  "))


@main.command()
@click.option("--todo", help="services to run in order, comma-separated (A,B)")
@click.option("--rubric", help="a rubric of the score")
@click.option("--client", "client_id", help="a client whose setup names the rubric")
@click.option("--input", "input_json", help="the input, as JSON (- reads stdin)")
@click.option(
    "--input-text", "input_text", help="the input, a string sent as it is (- reads stdin)"
)
@click.option("--key", help="tracking key; the same key twice gives the same request")
@click.option("--wait", is_flag=True, help="wait for the request to end and print it")
@click.option("--timeout", default=300.0, show_default=True, help="longest --wait, seconds")
@server_option
@token_option
@json_option
def submit(
    todo: str | None,
    rubric: str | None,
    client_id: str | None,
    input_json: str | None,
    input_text: str | None,
    key: str | None,
    wait: bool,
    timeout: float,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Send a request to a running system."""
    todo_list = [s.strip() for s in todo.split(",") if s.strip()] if todo is not None else None
    value = _parse_input(input_json, input_text)
    with Client(server, token) as client:
        request = client.submit(
            value,
            rubric=rubric,
            client=client_id,
            todo=todo_list,
            key=_key(key, "--key"),
            wait=timeout if wait else 0,
        )
    _show(request, as_json)
    _ended(request["status"], wait)


def lookup_options(what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options of a command that shows one thing by id or key: REF, --wait and so on."""

    def wrap(func: Callable[..., None]) -> Callable[..., None]:
        decorators: list[Any] = [
            click.argument("ref", metavar="ID_OR_KEY"),
            click.option("--wait", is_flag=True, help=f"wait for the {what} to end"),
            click.option("--timeout", default=300.0, show_default=True),
            server_option,
            token_option,
            json_option,
        ]
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return wrap


@main.command()
@lookup_options("request")
def get(
    ref: str, wait: bool, timeout: float, server: str, token: str | None, as_json: bool
) -> None:
    """Show a request (by id or tracking key) with the trace of every job."""
    ref = _key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        request = client.wait(ref, timeout) if wait else client.get(ref)
    _show(request, as_json)
    _ended(request["status"], wait)


@main.command(name="list")
@click.option(
    "--status", type=click.Choice(["PENDING", "RUNNING", "COMPLETE", "FAILED", "CANCELLED"])
)
@click.option("--limit", default=20, show_default=True)
@server_option
@token_option
@json_option
def list_(status: str | None, limit: int, server: str, token: str | None, as_json: bool) -> None:
    """List requests, newest first."""
    with Client(server, token) as client:
        requests = client.list(status, limit)
    if as_json:
        click.echo(json.dumps(requests, indent=2))
        return
    for r in requests:
        click.echo(
            f"{r['id']}  {r['status']:<9} {r.get('rubric') or '-':<24} key={r['key']}"
            f" result={r.get('result_preview') or '-'}"
        )


@main.command()
@click.argument("ref", metavar="ID_OR_KEY")
@server_option
@token_option
@json_option
def cancel(ref: str, server: str, token: str | None, as_json: bool) -> None:
    """Cancel a request that has not ended."""
    ref = _key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        _show(client.cancel(ref), as_json)


@main.command()
@click.argument("ref", metavar="ID_OR_KEY")
@server_option
@token_option
@json_option
def retry(ref: str, server: str, token: str | None, as_json: bool) -> None:
    """Run a FAILED or CANCELLED request again from the tasks that did not complete."""
    ref = _key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        _show(client.retry(ref), as_json)


def _instances_cell(service: dict[str, Any]) -> str:
    """``3 (2 busy, 1 starting)``: the count and how many are in each state."""
    if "instances" not in service:
        return "-"
    from bach.core.scaling import INSTANCE_STATES

    states = Counter(service.get("instance_states", {}).values())
    shown = ", ".join(f"{states[s]} {s}" for s in INSTANCE_STATES if states[s])
    return f"{service['instances']} ({shown})" if shown else str(service["instances"])


def _status_view(figures: dict[str, Any], events: list[dict[str, Any]]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"active requests {figures['active_requests']}   active tasks {figures['active_tasks']}"
        f"   queued tasks {figures['queued_tasks']}   still to run {figures.get('tasks_to_run', 0)}"
    )
    table = Table(box=None, pad_edge=False)
    for column in ("service", "queued", "running", "instances", "min-max", "jobs/s",
                   "time s", "done", "failed", "oldest s", "bottleneck"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("service", "bottleneck") else "right")
    for name, s in figures["services"].items():
        table.add_row(
            name,
            str(s.get("queued", 0)),
            str(s.get("running", 0)),
            _instances_cell(s),
            f"{s.get('min_instances', '-')}-{s.get('max_instances', '-')}",
            f"{s.get('arrival_rate', 0):.1f}",
            "-" if s.get("service_time") is None else f"{s['service_time']:.3f}",
            str(s.get("completed", "-")),
            str(s.get("failed", "-")),
            "-" if s.get("oldest_queued_age") is None else f"{s['oldest_queued_age']:.1f}",
            s.get("bottleneck") or "",
        )
    lines: list[Table | Text] = [head, table]
    workers = figures.get("workers") or []
    if workers:
        lines.append(Text("workers:"))
        for w in workers:
            since = time.strftime("%H:%M:%S", time.localtime(w.get("since") or 0))
            kind = "supervised" if w.get("supervised") else "started by hand"
            lines.append(
                Text(
                    f"  {w.get('host')} pid {w.get('pid')} {','.join(w.get('services', []))}"
                    f" since {since} jobs done {w.get('jobs_done', 0)}"
                    f" running {w.get('running', 0)}/{w.get('concurrency', 1)} ({kind})"
                )
            )
    if events:
        lines.append(Text("scaling:"))
        for e in events[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            lines.append(Text(f"  {when} {e['service']} {e['from']} -> {e['to']} ({e['reason']})"))
    return Group(*lines)


@main.command()
@click.option("--watch", is_flag=True, help="refresh the table until Ctrl-C")
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@server_option
@token_option
@json_option
def status(watch: bool, interval: float, server: str, token: str | None, as_json: bool) -> None:
    """Show the system's figures: requests, tasks, each service, scaling decisions."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    with Client(server, token) as client:
        if as_json:
            click.echo(json.dumps(client.stats(), indent=2))
            return
        frames = _status_frames(client, interval)
        first, _ = next(frames)  # the server cannot be reached: exit 3 at once
        if not watch:
            width = None if sys.stdout.isatty() else 160  # a pipe gets the whole table
            Console(width=width).print(first)
            return
        with contextlib.suppress(KeyboardInterrupt):
            if not sys.stdout.isatty():  # a pipe or a file: a stamped table per refresh
                console = Console(width=160)
                console.print(Text(time.strftime("%H:%M:%S")), first, "")
                for table, warning in frames:
                    console.print(warning or Text(time.strftime("%H:%M:%S")))
                    if warning is None:
                        console.print(table, "")
                return
            with Live(first, auto_refresh=False) as live:
                for table, warning in frames:
                    live.update(table if warning is None else Group(warning, table), refresh=True)


def _status_frames(client: Client, interval: float) -> Iterator[tuple[Any, Any]]:
    """The status table now, then every ``interval`` seconds, each with a warning or None.
    The first fetch raises if the server cannot be reached; later, the last table comes
    with a warning until it can be again, so a restart of the server does not end a watch."""
    from rich.text import Text

    last = _status_view(client.stats(), client.scaling_events())
    yield last, None
    while True:
        time.sleep(interval)
        try:
            last = _status_view(client.stats(), client.scaling_events())
            yield last, None
        except ClientError as exc:
            stamp = time.strftime("%H:%M:%S")
            yield last, Text(f"{stamp} {exc}; retrying", style="bold red")


def _show_tree(run: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    click.echo(f"command run {run['id']} (key {run['key']}): {run['status']}")
    if run.get("error"):
        click.echo(f"error: {run['error']['type']}: {run['error']['message']}")

    def walk(children: dict[str, Any], depth: int) -> None:
        for name, node in children.items():
            label = name if name == node["command"] else f"{name} ({node['command']})"
            line = f"{'  ' * depth}{label}: {node['status']} request={json.dumps(node['request'])}"
            if node["status"] == "COMPLETE":
                line += f" response={json.dumps(node['response'])}"
            if node.get("error") and node["status"] != "COMPLETE":
                line += f" error={node['error']['type']}: {node['error']['message']}"
            click.echo(line)
            walk(node.get("children", {}), depth + 1)

    walk(run["children"], 1)


@main.group()
def command() -> None:
    """Run durable commands (seed 004) on a running system."""


@command.command(name="run")
@click.argument("name")
@click.option("--request", "request_json", help="the request, as JSON (- reads stdin)")
@click.option(
    "--request-text", "request_text", help="the request, a string sent as it is (- reads stdin)"
)
@click.option("--key", help="tracking key; the same key twice gives the same run")
@click.option("--wait", is_flag=True, help="wait for the run to end and print its tree")
@click.option("--timeout", default=300.0, show_default=True, help="longest --wait, seconds")
@server_option
@token_option
@json_option
def command_run(
    name: str,
    request_json: str | None,
    request_text: str | None,
    key: str | None,
    wait: bool,
    timeout: float,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Start command NAME with a request."""
    value = _parse_input(request_json, request_text, "--request", "--request-text")
    with Client(server, token) as client:
        run = client.run_command(name, value, key=_key(key, "--key"), wait=timeout if wait else 0)
    _show_tree(run, as_json)
    _ended(run["status"], wait)


@command.command(name="get")
@lookup_options("run")
def command_get(
    ref: str, wait: bool, timeout: float, server: str, token: str | None, as_json: bool
) -> None:
    """Show a command run (by id or key) as its tree of calls."""
    ref = _key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        run = client.wait_command(ref, timeout) if wait else client.get_command(ref)
    _show_tree(run, as_json)
    _ended(run["status"], wait)


@main.command()
@click.option(
    "--score",
    "scores",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="also the plugins these score files name",
)
@plugin_option
def plugins(scores: tuple[str, ...], plugins: tuple[str, ...]) -> None:
    """List the plugins found: installed ones, and those named by scores or --plugin."""
    from bach.commands import command_name
    from bach.core.score import Score
    from bach.runtime.boot import load_plugins

    score = _load(scores) if scores else Score()
    _, found = load_plugins(score, plugins)
    for plugin in found.plugins:
        commands = ", ".join(sorted(command_name(c) for c in plugin.commands)) or "-"
        services = ", ".join(sorted(plugin.services)) or "-"
        click.echo(f"{plugin.name}  ({plugin.origin})  commands: {commands}  services: {services}")
    for name, reason in found.broken:
        click.echo(f"{name}  BROKEN: {reason}", err=True)
    if not found.plugins and not found.broken:
        click.echo("no plugins found")
    if found.broken:
        sys.exit(exits.USAGE)

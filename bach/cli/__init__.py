"""The ``bach`` command: run a system (serve, worker) and talk to one (submit, get, ...).

Every option can also come from a ``BACH_*`` environment variable, shown in ``--help``.
Errors are one line on stderr and an exit status of ``bach.exits`` (0 done, 1 the request
failed, 2 bad usage or input, 3 the server or store cannot be reached, 4 internal error).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from bach import exits
from bach.cli.commands import command
from bach.cli.common import (
    Duration,
    checked_key,
    env_option,
    exit_for,
    json_option,
    limit_option,
    limits_of,
    list_options,
    log_format_option,
    log_level_option,
    lookup_options,
    parse_input,
    plugin_option,
    ref_options,
    run_loop,
    score_option,
    server_option,
    store_option,
    token_option,
)
from bach.cli.status import status
from bach.client import Client


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
@env_option(
    "--host",
    env="BACH_HOST",
    default="127.0.0.1",
    show_default=True,
    help="address to listen on; beyond loopback it needs --token (or --insecure)",
)
@env_option(
    "--port",
    env="BACH_PORT",
    default=8080,
    show_default=True,
    type=int,
    help="0 picks a free port (printed at start)",
)
@token_option
@env_option(
    "--insecure",
    env="BACH_INSECURE",
    is_flag=True,
    help="listen beyond loopback without a token: anyone who can reach the port can submit,"
    " cancel and read everything",
)
@env_option(
    "--no-workers",
    "no_workers",
    env="BACH_NO_WORKERS",
    is_flag=True,
    help="run the engine and API only; workers run elsewhere",
)
@env_option(
    "--grace",
    env="BACH_GRACE",
    default=10.0,
    show_default=True,
    type=float,
    help="seconds workers get to finish their jobs when stopping",
)
@env_option(
    "--retain",
    env="BACH_RETAIN",
    default=None,
    type=Duration(),
    help="forget ended requests this long after they end (e.g. 7d); default keep all",
)
@env_option(
    "--max-instances",
    env="BACH_MAX_INSTANCES",
    default=None,
    type=click.IntRange(min=1),
    help="cap on worker instances over all services; default each service's max only",
)
@env_option(
    "--fork-server/--no-fork-server",
    env="BACH_FORK_SERVER",
    default=True,
    show_default=True,
    help="start workers by forking a process that has Bach imported (milliseconds, not"
    " half a second); off: each worker is a new Python process",
)
@limit_option("body", "size", "bytes of one HTTP request body")
@limit_option("input", "size", "bytes of a request's input or a command's request")
@limit_option("result", "size", "bytes of one job's result or a command's response")
@limit_option("key", "count", "characters of a tracking key")
@limit_option("tasks", "count", "tasks in one todo request, commands in one run")
@limit_option("depth", "count", "levels of nesting in any JSON value")
@limit_option("request", "size", "bytes of a request as stored: its input, jobs and results")
@plugin_option
@log_level_option
@log_format_option
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
    log_format: str,
    **limits: int | None,
) -> None:
    """Start the system: engine, HTTP API and one worker process per service."""
    from bach.runtime import logs
    from bach.runtime.boot import check_score, load_plugins, log_plugins
    from bach.runtime.server import ServeOptions, check_exposure, listen, serve

    check_exposure(host, token, insecure)  # before anything starts or logs
    sock = listen(host, port)
    logs.configure(log_level, log_format)
    logs.export(log_level, log_format)  # the workers it starts log the same way
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
        limits=limits_of(**{name[4:]: value for name, value in limits.items()}),
        insecure=insecure,
    )
    run_loop(serve(score, options, registry, sock))


@main.command()
@score_option
@env_option("--service", env="BACH_SERVICE", required=True, help="the service to serve")
@store_option
@env_option(
    "--concurrency",
    env="BACH_CONCURRENCY",
    default=None,
    type=int,
    help="jobs run at once (default: the service's concurrency in the score)",
)
@env_option("--grace", env="BACH_GRACE", default=10.0, show_default=True, type=float)
@env_option(
    "--lease",
    env="BACH_LEASE",
    default=15.0,
    show_default=True,
    type=float,
    help="seconds a job stays leased without a heartbeat before it goes back to its queue",
)
@limit_option("result", "size", "bytes of one job's result")
@limit_option("depth", "count", "levels of nesting in a result")
@plugin_option
@click.option("--parent-pid", type=int, default=None, hidden=True)
@click.option("--ready-fd", type=int, default=None, hidden=True)
@log_level_option
@log_format_option
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
    log_format: str,
    max_result: int | None,
    max_depth: int | None,
) -> None:
    """Serve one service: take its jobs from the store, run them, report back."""
    from bach.runtime import logs
    from bach.runtime.boot import run_worker

    logs.configure(log_level, log_format)
    limits = limits_of(result=max_result, depth=max_depth)
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


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def show_request(request: dict[str, Any], as_json: bool) -> None:
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
    value = parse_input(input_json, input_text)
    with Client(server, token) as client:
        request = client.submit(
            value,
            rubric=rubric,
            client=client_id,
            todo=todo_list,
            key=checked_key(key, "--key"),
            wait=timeout if wait else 0,
        )
    show_request(request, as_json)
    exit_for(request["status"], wait)


@main.command()
@lookup_options("request")
def get(
    ref: str, wait: bool, timeout: float, server: str, token: str | None, as_json: bool
) -> None:
    """Show a request (by id or tracking key) with the trace of every job."""
    ref = checked_key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        request = client.wait(ref, timeout) if wait else client.get(ref)
    show_request(request, as_json)
    exit_for(request["status"], wait)


@main.command(name="list")
@list_options
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
@ref_options
def cancel(ref: str, server: str, token: str | None, as_json: bool) -> None:
    """Cancel a request that has not ended."""
    ref = checked_key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        show_request(client.cancel(ref), as_json)


@main.command()
@ref_options
def retry(ref: str, server: str, token: str | None, as_json: bool) -> None:
    """Run a FAILED or CANCELLED request again from the tasks that did not complete."""
    ref = checked_key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        show_request(client.retry(ref), as_json)


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


main.add_command(command)
main.add_command(status)

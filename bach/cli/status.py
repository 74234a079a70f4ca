"""``bach status``: the system's figures as a table, once or refreshed until Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click

from bach.cli.common import (
    json_option,
    server_option,
    token_option,
)
from bach.client import Client, ClientError


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


@click.command()
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

"""``bach command``: run, show, list and cancel durable commands (seed 004)."""

from __future__ import annotations

import json
from typing import Any

import click

from bach.cli.common import (
    checked_key,
    exit_for,
    json_option,
    list_options,
    lookup_options,
    parse_input,
    ref_options,
    server_option,
    token_option,
)
from bach.client import Client


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


@click.group()
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
    value = parse_input(request_json, request_text, "--request", "--request-text")
    with Client(server, token) as client:
        run = client.run_command(
            name, value, key=checked_key(key, "--key"), wait=timeout if wait else 0
        )
    _show_tree(run, as_json)
    exit_for(run["status"], wait)


@command.command(name="get")
@lookup_options("run")
def command_get(
    ref: str, wait: bool, timeout: float, server: str, token: str | None, as_json: bool
) -> None:
    """Show a command run (by id or key) as its tree of calls."""
    ref = checked_key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        run = client.wait_command(ref, timeout) if wait else client.get_command(ref)
    _show_tree(run, as_json)
    exit_for(run["status"], wait)


@command.command(name="list")
@list_options
def command_list(
    status: str | None, limit: int, server: str, token: str | None, as_json: bool
) -> None:
    """List command runs, newest first."""
    with Client(server, token) as client:
        runs = client.list_commands(status, limit)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
        return
    for r in runs:
        calls = ",".join(
            name if name == cmd else f"{name}({cmd})" for name, cmd in r.get("commands", {}).items()
        )
        line = f"{r['id']}  {r['status']:<9} {calls or '-':<24} key={r['key']}"
        if r.get("error"):
            line += f" error={r['error']['type']}: {r['error']['message']}"
        if r.get("unreadable"):
            line += f" unreadable: {r['unreadable']}"
        click.echo(line)


@command.command(name="cancel")
@ref_options
def command_cancel(ref: str, server: str, token: str | None, as_json: bool) -> None:
    """Cancel a command run that has not ended: no child call starts after."""
    ref = checked_key(ref, "ID_OR_KEY") or ref
    with Client(server, token) as client:
        _show_tree(client.cancel_command(ref), as_json)

"""Durable commands with real processes: the pulled plug, and plugins from packages."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import bach, pull_plug, running_system, start_system, stop

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A command that calls child 1, waits for a marker file, then calls child 2."""
import os
import time
from pathlib import Path

import bach.commands as bach

HOME = Path(os.environ["PLUG_HOME"])


class Child(bach.Command):
    def execute(self, context, request):
        with open(HOME / f"calls-{request['name']}", "a") as log:
            log.write("x")
        return request["value"] * 10


class PlugPulled(bach.Command):
    def execute(self, context, request):
        one = context.execute(Child, {"name": "one", "value": request}, alias="one")
        while not (HOME / "marker").exists():
            time.sleep(0.05)
        two = context.execute(Child, {"name": "two", "value": one}, alias="two")
        return two + 1
'''

SCORE = "services: {}\nplugins: [plugpulled]\n"


def calls(home: Path, name: str) -> int:
    path = home / f"calls-{name}"
    return len(path.read_text()) if path.exists() else 0


def test_pulled_plug_resumes_without_running_a_completed_child_again(
    tmp_path: Path, shared_store: str
) -> None:
    (tmp_path / "plugpulled.py").write_text(PLUGIN)
    score = tmp_path / "score.yaml"
    score.write_text(SCORE)
    env = {"PLUG_HOME": str(tmp_path)}
    first = start_system([score], shared_store, tmp_path, env=env)
    try:
        run = httpx.post(
            f"{first.url}/api/commands",
            json={"commands": [{"command": "PlugPulled", "request": 4}]},
        ).json()
        deadline = time.monotonic() + 20
        state: dict = {}
        while time.monotonic() < deadline:
            state = httpx.get(f"{first.url}/api/commands/{run['id']}").json()
            one = state["children"]["PlugPulled"]["children"].get("one")
            if one and one["status"] == "COMPLETE":
                break
            time.sleep(0.05)
        assert state["status"] == "RUNNING", state
        assert state["children"]["PlugPulled"]["status"] == "RUNNING"
        pull_plug(first)  # mid-flight, workers included
    finally:
        stop(first.process)
    assert calls(tmp_path, "one") == 1 and calls(tmp_path, "two") == 0
    (tmp_path / "marker").touch()

    with running_system([score], shared_store, tmp_path, env=env) as second:
        done = httpx.get(
            f"{second.url}/api/commands/{run['id']}", params={"wait": 30}, timeout=60
        ).json()
    assert done["status"] == "COMPLETE", done
    parent = done["children"]["PlugPulled"]
    assert parent["response"] == 401  # ((4 * 10) * 10) + 1
    assert parent["children"]["one"]["response"] == 40
    assert parent["children"]["two"]["response"] == 400
    assert calls(tmp_path, "one") == 1  # came from the store, not run again
    assert calls(tmp_path, "two") == 1


def install_fake_package(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """What pip leaves behind: the modules and a dist-info with entry points."""
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[bach.plugins]\n{entry_points}\n")


def test_installed_plugins_are_found_and_a_broken_one_does_not_stop_the_others(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_fake_package(
        site,
        "bach_greeter",
        "greeter = greeter_plugin",
        {
            "greeter_plugin": (
                "import bach.commands as bach\n\n"
                "class Greet(bach.Command):\n"
                "    def execute(self, context, request):\n"
                "        return f'hello {request}'\n\n"
                "commands = [Greet]\n"
            )
        },
    )
    install_fake_package(site, "bach_broken", "broken = missing_module_xyz", {})
    env = {"PYTHONPATH": str(site)}
    listed = bach("plugins", env=env)
    assert "greeter" in listed.stdout and "commands: Greet" in listed.stdout
    assert "broken" in listed.stderr and "missing_module_xyz" in listed.stderr
    assert listed.returncode == 2
    score = tmp_path / "score.yaml"
    score.write_text("services: {}\n")
    with running_system([score], f"sqlite:///{tmp_path}/bach.db", tmp_path, env=env) as system:
        state = httpx.post(
            f"{system.url}/api/commands",
            params={"wait": 10},
            json={"commands": [{"command": "Greet", "request": "bach"}]},
        ).json()
        log = system.log.read_text()
    assert state["children"]["Greet"]["response"] == "hello bach"
    assert "plugin greeter" in log and "plugin broken is broken" in log


def test_a_plugin_module_given_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "plugpulled.py").write_text(PLUGIN)
    (tmp_path / "marker").touch()
    score = tmp_path / "score.yaml"
    score.write_text("services: {}\n")
    env = {"PLUG_HOME": str(tmp_path), "PYTHONPATH": str(tmp_path)}
    with running_system(
        [score], f"sqlite:///{tmp_path}/bach.db", tmp_path, "--plugin", "plugpulled", env=env
    ) as system:
        state = httpx.post(
            f"{system.url}/api/commands",
            params={"wait": 10},
            json={"commands": [{"command": "PlugPulled", "request": 1}]},
        ).json()
    assert state["children"]["PlugPulled"]["response"] == 101

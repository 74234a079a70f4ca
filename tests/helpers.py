"""Running real Bach processes in tests; everything started is stopped, even on failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"
BACH = [sys.executable, "-m", "bach"]


@dataclass
class System:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def start_system(
    scores: Sequence[Path],
    store: str,
    cwd: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> System:
    args = [*BACH, "serve", "--port", "0", "--store", store, "--log-level", "INFO"]
    for score in scores:
        args += ["--score", str(score)]
    log = cwd / f"serve-{len(list(cwd.glob('serve-*.log')))}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*args, *extra],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://\S+", line)
    if match is None:
        stop(proc)
        raise AssertionError(f"bach serve did not start: {line!r}\n{log.read_text()}")
    return System(match.group(0), proc, log)


def pull_plug(system: System) -> None:
    """The whole system dies at once, workers included, as in a power cut."""
    victims = [psutil.Process(system.process.pid), *system.children()]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL for the process and anything it left behind."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def running_system(
    scores: Sequence[Path], store: str, cwd: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[System]:
    system = start_system(scores, store, cwd, *extra, env=env)
    try:
        yield system
    finally:
        stop(system.process)


def bach(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `bach` command line as its own process."""
    return subprocess.run(
        [*BACH, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

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
        """Every process the system started: the fork server and the workers."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.children() if "bach worker" in " ".join(_cmdline(p))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
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


def kill_all(procs: Sequence[psutil.Process]) -> None:
    """SIGKILL, and wait until they are gone."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def pull_plug(system: System) -> None:
    """The whole system dies at once, workers included, as in a power cut."""
    kill_all([psutil.Process(system.process.pid), *system.children()])


class Workers:
    """Hand-run ``bach worker`` processes; all of them are stopped at the end."""

    def __init__(
        self,
        store: str,
        cwd: Path,
        env: dict[str, str],
        scores: Sequence[Path],
        lease: str | None = None,
    ) -> None:
        self.store, self.cwd, self.env, self.scores, self.lease = store, cwd, env, scores, lease
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, service: str) -> subprocess.Popen[str]:
        args = [*BACH, "worker", "--service", service, "--store", self.store]
        if self.lease is not None:
            args += ["--lease", self.lease]
        for score in self.scores:
            args += ["--score", str(score)]
        with open(self.cwd / f"worker-{service}-{len(self.procs)}.log", "w") as stderr:
            proc = subprocess.Popen(
                args, cwd=self.cwd, stderr=stderr, text=True, env={**os.environ, **self.env}
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            stop(proc)


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


def error_of(response: Any) -> dict[str, str]:
    """The API's error shape, ``{"error": {"type", "field", "reason"}}``, and nothing else."""
    body = response.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])

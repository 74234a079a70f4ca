"""Bach beside Celery on the same two-step chain, measured side by side in one run.

Each system runs the chain "A adds 2, then B doubles" with two worker processes:

- Bach: ``bach serve`` on ``bench/chain.yaml`` (one worker process per service) and
  ad-hoc requests ``{"input": i, "todo": ["A", "B"]}`` posted with ``?wait=30``, so one
  HTTP round trip is submit-to-result.
- Celery: ``chain(add_two.s(i), double.s())`` on Redis (broker and result backend),
  ``celery worker --concurrency 2``.

Two phases per round, systems alternating A/B/A/B within each phase:

- throughput: ``--requests`` chains with ``--concurrency`` in flight; steps/s = 2 x chains/s.
- latency: ``--single`` chains one at a time; submit-to-result p50 and p99.

The figures printed are medians over ``--rounds``, with Bach's ratio to Celery. The
load generator for Bach is a lean asyncio HTTP/1.1 keep-alive client (an httpx client
tops out near 200 requests/s here and would measure itself); its CPU share is printed
so a client-bound run shows. Every result is checked: a wrong or missing answer aborts.

    python bench/throughput.py                      # Bach on SQLite (durable) vs Celery
    python bench/throughput.py --store memory://    # Bach without a durable store
    python bench/throughput.py --systems bach       # Bach alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

HERE = Path(__file__).resolve().parent
STEPS = 2  # tasks per chain


def expected(value: int) -> int:
    return (value + 2) * 2


@dataclass
class Sample:
    chains: int
    elapsed: float
    latencies: list[float]
    client_cpu: float
    system_cpu: float

    @property
    def steps_per_s(self) -> float:
        return self.chains * STEPS / self.elapsed

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_ms_per_step(self) -> float:
        return self.system_cpu / (self.chains * STEPS) * 1000


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and its children."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


def measure(pid: int, chains: int, run: Callable[[], list[float]]) -> Sample:
    client0, system0 = time.process_time(), tree_cpu(pid)
    start = time.perf_counter()
    latencies = run()
    elapsed = time.perf_counter() - start
    client = (time.process_time() - client0) / elapsed
    return Sample(chains, elapsed, latencies, client, tree_cpu(pid) - system0)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
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


# -- Bach ------------------------------------------------------------------------------


class Connection:
    """One HTTP/1.1 keep-alive connection that posts JSON and reads the JSON answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base: str) -> Connection:
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        return cls(reader, writer, f"{url.hostname}:{url.port}")

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
        length = int(fields["content-length"])
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        self.writer.close()


async def bach_chains(base: str, values: range, concurrency: int) -> list[float]:
    todo = deque(values)
    latencies: list[float] = []

    async def lane() -> None:
        conn = await Connection.open(base)
        try:
            while todo:
                value = todo.popleft()
                start = time.perf_counter()
                status, view = await conn.post(
                    "/api/requests?wait=30", {"input": value, "todo": ["A", "B"]}
                )
                latencies.append(time.perf_counter() - start)
                if status != 201 or view.get("result") != expected(value):
                    raise SystemExit(f"bach: input {value} gave {status} {view}")
        finally:
            conn.close()

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies


class BachSystem:
    name = "bach"

    def __init__(
        self, store: str, workdir: Path, score: Path = HERE / "chain.yaml", *extra: str
    ) -> None:
        log = open(workdir / "bach-serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bach", "serve", "--score", str(score),
             "--store", store, "--port", "0", "--log-level", "WARNING", *extra],
            cwd=workdir, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        match = re.search(r"http://\S+", self.proc.stdout.readline() if ready else "")
        if match is None:
            stop_process(self.proc)
            raise SystemExit(f"bach serve did not start; see {log.name}")
        self.base = match.group(0)
        self.offset = 0

    def values(self, n: int) -> range:
        self.offset += n
        return range(self.offset - n, self.offset)

    def run(self, n: int, concurrency: int) -> Sample:
        values = self.values(n)
        return measure(
            self.proc.pid, n, lambda: asyncio.run(bach_chains(self.base, values, concurrency))
        )

    def close(self) -> None:
        stop_process(self.proc)


# -- Celery ----------------------------------------------------------------------------


class CelerySystem:
    name = "celery"

    def __init__(self, url: str, workers: int, workdir: Path):
        import redis

        redis.Redis.from_url(url).flushdb()  # the run owns this database
        os.environ["BENCH_CELERY_URL"] = url
        sys.path.insert(0, str(HERE))
        import celery_chain

        self.module = celery_chain
        log = open(workdir / "celery-worker.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_chain", "worker",
             "--concurrency", str(workers), "--pool", "prefork", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "BENCH_CELERY_URL": url},
        )  # fmt: skip
        self.offset = 0

    def chain(self, value: int) -> Any:
        from celery import chain

        return chain(self.module.add_two.s(value), self.module.double.s()).apply_async()

    def run(self, n: int, concurrency: int) -> Sample:
        self.offset += n
        values = range(self.offset - n, self.offset)

        def window() -> list[float]:
            # Keep `concurrency` chains in flight, collecting the oldest first.
            pending: deque[tuple[int, float, Any]] = deque()
            latencies = []
            feed = iter(values)
            for value in feed:
                pending.append((value, time.perf_counter(), self.chain(value)))
                if len(pending) < concurrency:
                    continue
                latencies.append(self.collect(*pending.popleft()))
            while pending:
                latencies.append(self.collect(*pending.popleft()))
            return latencies

        return measure(self.proc.pid, n, window)

    @staticmethod
    def collect(value: int, start: float, result: Any) -> float:
        got = result.get(timeout=60)
        if got != expected(value):
            raise SystemExit(f"celery: input {value} gave {got}")
        return time.perf_counter() - start

    def close(self) -> None:
        stop_process(self.proc)


# -- the run ---------------------------------------------------------------------------


@contextlib.contextmanager
def systems(args: argparse.Namespace, workdir: Path) -> Iterator[list[Any]]:
    started: list[Any] = []
    try:
        for name in args.systems:
            if name == "bach":
                store = args.store or f"sqlite:///{workdir}/bach.db"
                started.append(BachSystem(store, workdir))
            else:
                started.append(CelerySystem(args.celery_url, args.celery_workers, workdir))
        yield started
    finally:
        for system in started:
            system.close()


def report(phase: str, results: dict[str, list[Sample]]) -> list[str]:
    lines = [
        f"{phase}: medians of {len(next(iter(results.values())))} rounds",
        f"  {'system':8} {'steps/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/step':>12} "
        f"{'client CPU':>11}",
    ]
    medians: dict[str, float] = {}
    for name, samples in results.items():
        medians[name] = statistics.median(s.steps_per_s for s in samples)
        p50 = statistics.median(s.percentile(0.50) for s in samples)
        p99 = statistics.median(s.percentile(0.99) for s in samples)
        cpu = statistics.median(s.cpu_ms_per_step for s in samples)
        client = statistics.median(s.client_cpu for s in samples)
        lines.append(
            f"  {name:8} {medians[name]:9.0f} {p50:8.2f} {p99:8.2f} {cpu:12.2f} {client:10.0%}"
        )
    if "bach" in medians and "celery" in medians:
        lines.append(f"  ratio bach/celery steps/s: {medians['bach'] / medians['celery']:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="chains per throughput run")
    parser.add_argument("--concurrency", type=int, default=32, help="chains in flight")
    parser.add_argument("--single", type=int, default=300, help="chains in the latency run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--systems", default="bach,celery", help="comma-separated")
    parser.add_argument("--store", help="Bach store URL (default: SQLite in a temp folder)")
    parser.add_argument(
        "--celery-url",
        default="redis://127.0.0.1:6379/15",
        help="Redis db for Celery's broker and results; the run FLUSHES it",
    )
    parser.add_argument("--celery-workers", type=int, default=2)
    args = parser.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in args.systems:
        if name not in ("bach", "celery"):
            parser.error(f"--systems: unknown system {name!r} (bach, celery)")

    print(f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    with tempfile.TemporaryDirectory(prefix="bach-bench-") as tmp, systems(args, Path(tmp)) as run:
        for system in run:
            system.run(args.warmup, args.concurrency)
        phases: dict[str, dict[str, list[Sample]]] = {
            f"throughput ({args.requests} chains, {args.concurrency} in flight)": {},
            f"latency ({args.single} chains, one at a time)": {},
        }
        throughput, latency = phases.values()
        for round_no in range(args.rounds):
            for system in run:
                throughput.setdefault(system.name, []).append(
                    system.run(args.requests, args.concurrency)
                )
            for system in run:
                latency.setdefault(system.name, []).append(system.run(args.single, 1))
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        store = args.store or "sqlite (durable, temp folder)"
        print(f"Bach store: {store}; Celery: {args.celery_workers} worker processes")
        for phase, results in phases.items():
            print("\n".join(report(phase, results)))


if __name__ == "__main__":
    main()

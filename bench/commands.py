"""Bach's durable commands beside DBOS Transact, measured side by side in one run.

Both are in-process libraries that checkpoint each child call of a parent to SQLite:

- Bach: a ``CommandRunner`` driven directly on uvloop (as ``bach serve`` runs it), a
  parent command ``Steps`` calling a trivial ``Step`` child N times, each with its own
  alias; ``runner.submit`` then ``runner.wait``. Store: a SQLite file in WAL mode with
  ``synchronous=FULL``, Bach's durable default (an fsync per commit; concurrent commits
  share one, group commit).
- DBOS: a ``@DBOS.workflow()`` calling a trivial ``@DBOS.step()`` N times, on DBOS's
  default SQLite system database, left on DBOS's settings (it sets no journal mode and
  no ``synchronous``, so SQLite's defaults apply: a rollback journal, ``synchronous=FULL``;
  the run prints what its own connection reports). ``--systems dbos-wal`` adds DBOS on
  a file switched to WAL before launch (the mode is stored in the file), otherwise the
  same: an fsync per commit, like Bach.

N is 0 (a parent's base cost), 2 and 10 (``--steps``). Each round starts every system in
a fresh process with a fresh database (DBOS is a process-wide singleton with background
threads), systems alternating A/B/A/B; per N, ``--warmup`` runs then ``--runs`` runs,
``--concurrency`` at a time (default 1: a user waiting for each run). Printed: medians over
``--rounds`` of runs/s, steps/s (N x runs/s), p50 and p99 submit-to-result, durable
commits per run and process CPU per run (all threads); then the per-step overhead
``(p50(N) - p50(0)) / N`` from those medians, and DBOS's over Bach's. Every result is
checked: a wrong or missing answer aborts.

    python bench/commands.py                          # Bach vs DBOS on their defaults
    python bench/commands.py --systems bach,dbos-wal  # DBOS switched to WAL as well
    python bench/commands.py --style async            # async def commands and steps
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.metadata
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEMS = ("bach", "dbos", "dbos-wal")


def expected(value: int, steps: int) -> int:
    return value + steps


@dataclass
class Sample:
    runs: int
    steps: int
    elapsed: float
    latencies: list[float]
    cpu: float
    commits: int

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_ms_per_run(self) -> float:
        return self.cpu / self.runs * 1000


def lanes_sync(values: range, concurrency: int, one: Callable[[int], None]) -> list[float]:
    """Run ``one(value)`` for each value, ``concurrency`` at a time; the latencies."""
    todo = iter(values)
    latencies: list[float] = []

    def lane() -> None:
        for value in todo:  # a shared iterator: next() is atomic under the GIL
            start = time.perf_counter()
            one(value)
            latencies.append(time.perf_counter() - start)

    if concurrency == 1:
        lane()
    else:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(lane) for _ in range(concurrency)]:
                future.result()
    return latencies


async def lanes_async(values: range, concurrency: int, one: Callable[[int], Any]) -> list[float]:
    todo = iter(values)
    latencies: list[float] = []

    async def lane() -> None:
        for value in todo:
            start = time.perf_counter()
            await one(value)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies


class Phases:
    """Fresh input values for each batch of runs, and a sample's clocks and counters."""

    def __init__(self, commits: Callable[[], int]) -> None:
        self.commits, self.offset = commits, 0

    def values(self, n: int) -> range:
        self.offset += n
        return range(self.offset - n, self.offset)

    def start(self) -> tuple[float, float, int]:
        return time.perf_counter(), time.process_time(), self.commits()

    def sample(self, steps: int, started: tuple[float, float, int], lat: list[float]) -> Sample:
        wall, cpu, commits = started
        return Sample(
            len(lat),
            steps,
            time.perf_counter() - wall,
            lat,
            time.process_time() - cpu,
            self.commits() - commits,
        )


# -- Bach ------------------------------------------------------------------------------


def bach_commands() -> list[type]:
    from bach.commands import Command

    class Step(Command):
        def execute(self, context: Any, request: int) -> int:
            return request + 1

    class Steps(Command):
        def execute(self, context: Any, request: dict[str, int]) -> int:
            value = request["value"]
            for i in range(request["steps"]):
                value = context.execute(Step, value, alias=f"s{i}")
            return value

    class AsyncStep(Command):
        async def execute(self, context: Any, request: int) -> int:
            return request + 1

    class AsyncSteps(Command):
        async def execute(self, context: Any, request: dict[str, int]) -> int:
            value = request["value"]
            for i in range(request["steps"]):
                value = await context.execute(AsyncStep, value, alias=f"s{i}")
            return value

    return [Step, Steps, AsyncStep, AsyncSteps]


class CountingBackend:
    """The backend, counting durable writes (a new run, and each transition)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.writes = backend, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def create(self, *args: Any) -> Any:
        self.writes += 1
        return await self.backend.create(*args)

    async def commit(self, transitions: Any) -> Any:
        self.writes += len(transitions)
        return await self.backend.commit(transitions)


async def bach_main(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bach.backends import open_backend
    from bach.commands.runner import CommandRunner, Registry
    from bach.core.score import Score

    store = args.store or f"sqlite:///{tmp}/bach.db"
    backend = CountingBackend(open_backend(store))
    registry = Registry()
    for cls in bach_commands():
        registry.add(cls, "bench")
    runner = CommandRunner(backend, Score(), registry, owner="bench:1:engine")  # type: ignore[arg-type]
    parent = "AsyncSteps" if args.style == "async" else "Steps"
    phases = Phases(lambda: backend.writes)

    async def one(value: int, steps: int) -> None:
        run, _ = await runner.submit(
            [{"command": parent, "request": {"value": value, "steps": steps}}]
        )
        run = await runner.wait(run.id, 60)
        got = run.root.children[parent].response
        if run.status.value != "COMPLETE" or got != expected(value, steps):
            raise SystemExit(f"bach: {value} with {steps} steps gave {run.view()}")

    results: dict[str, Any] = {}
    try:
        for steps in args.steps:

            def call(value: int, steps: int = steps) -> Any:
                return one(value, steps)

            await lanes_async(phases.values(args.warmup), args.concurrency, call)
            started = phases.start()
            lat = await lanes_async(phases.values(args.runs), args.concurrency, call)
            results[str(steps)] = phases.sample(steps, started, lat).__dict__
    finally:
        await runner.close()
        await backend.close()
    inner = backend.backend
    durability = (
        sqlite_settings(inner.path, inner.synchronous) if store.startswith("sqlite:") else store
    )
    return {"results": results, "durability": durability}


def sqlite_settings(path: Path, synchronous: str) -> str:
    with sqlite3.connect(path) as conn:  # the journal mode is stored in the file
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return f"SQLite journal_mode={mode}, synchronous={synchronous}"


def run_bach(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with tempfile.TemporaryDirectory(prefix="bach-bench-") as tmp:
        if uvloop is not None:
            out = uvloop.run(bach_main(args, Path(tmp)))
        else:
            out = asyncio.run(bach_main(args, Path(tmp)))
    loop = "uvloop" if uvloop is not None else "asyncio"
    out["label"] = f"Bach (CommandRunner in-process, {loop})"
    return out


# -- DBOS ------------------------------------------------------------------------------


def run_dbos(args: argparse.Namespace, wal: bool) -> dict[str, Any]:
    from dbos import DBOS
    from dbos._dbos import _get_dbos_instance
    from sqlalchemy import event

    with tempfile.TemporaryDirectory(prefix="dbos-bench-") as tmp:
        path = Path(tmp) / "dbos.sqlite"
        if wal:
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
        DBOS(
            config={
                "name": "bench",
                "system_database_url": f"sqlite:///{path}",
                "log_level": "WARNING",
            }
        )

        @DBOS.step()
        def step(value: int) -> int:
            return value + 1

        @DBOS.workflow()
        def steps_workflow(value: int, steps: int) -> int:
            for _ in range(steps):
                value = step(value)
            return value

        @DBOS.step()
        async def async_step(value: int) -> int:
            return value + 1

        @DBOS.workflow()
        async def async_steps_workflow(value: int, steps: int) -> int:
            for _ in range(steps):
                value = await async_step(value)
            return value

        DBOS.launch()
        try:
            engine = _get_dbos_instance()._sys_db.engine
            with engine.connect() as conn:
                mode, sync = (
                    conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "synchronous")
                )
            names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
            durability = f"SQLite journal_mode={mode}, synchronous={names.get(sync, sync)}"
            writes = [0]

            @event.listens_for(engine, "commit")
            def count(conn: Any) -> None:
                # pysqlite opens a transaction only for writes: count those that commit.
                if conn.connection.dbapi_connection.in_transaction:
                    writes[0] += 1

            phases = Phases(lambda: writes[0])
            results = (
                asyncio.run(dbos_async(args, phases, async_steps_workflow))
                if args.style == "async"
                else dbos_sync(args, phases, steps_workflow)
            )
        finally:
            DBOS.destroy()
    version = importlib.metadata.version("dbos")
    label = f"DBOS {version} (file switched to WAL)" if wal else f"DBOS {version} (defaults)"
    return {"results": results, "durability": durability, "label": label}


def dbos_sync(args: argparse.Namespace, phases: Phases, workflow: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for steps in args.steps:

        def one(value: int, steps: int = steps) -> None:
            got = workflow(value, steps)
            if got != expected(value, steps):
                raise SystemExit(f"dbos: {value} with {steps} steps gave {got!r}")

        lanes_sync(phases.values(args.warmup), args.concurrency, one)
        started = phases.start()
        lat = lanes_sync(phases.values(args.runs), args.concurrency, one)
        results[str(steps)] = phases.sample(steps, started, lat).__dict__
    return results


async def dbos_async(args: argparse.Namespace, phases: Phases, workflow: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for steps in args.steps:

        async def one(value: int, steps: int = steps) -> None:
            got = await workflow(value, steps)
            if got != expected(value, steps):
                raise SystemExit(f"dbos: {value} with {steps} steps gave {got!r}")

        await lanes_async(phases.values(args.warmup), args.concurrency, one)
        started = phases.start()
        lat = await lanes_async(phases.values(args.runs), args.concurrency, one)
        results[str(steps)] = phases.sample(steps, started, lat).__dict__
    return results


# -- the run ---------------------------------------------------------------------------


def child_args(args: argparse.Namespace, system: str) -> list[str]:
    out = [
        sys.executable, __file__, "--only", system, "--runs", str(args.runs),
        "--warmup", str(args.warmup), "--steps", ",".join(map(str, args.steps)),
        "--concurrency", str(args.concurrency), "--style", args.style,
    ]  # fmt: skip
    if args.store:
        out += ["--store", args.store]
    return out


def one_round(args: argparse.Namespace, system: str) -> dict[str, Any]:
    proc = subprocess.run(
        child_args(args, system), capture_output=True, text=True, timeout=900, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def report(args: argparse.Namespace, results: dict[str, dict[int, list[Sample]]]) -> list[str]:
    rounds = len(next(iter(next(iter(results.values())).values())))
    how = "one at a time" if args.concurrency == 1 else f"{args.concurrency} at a time"
    lines = [
        f"{args.runs} runs per N, {how}, {args.style} commands/steps: medians of {rounds} rounds",
        f"  {'system':9} {'N':>3} {'runs/s':>8} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'commits/run':>12} {'CPU ms/run':>11}",
    ]
    p50s: dict[str, dict[int, float]] = {}
    for name, by_steps in results.items():
        for steps, samples in by_steps.items():
            runs = statistics.median(s.runs_per_s for s in samples)
            p50 = statistics.median(s.percentile(0.50) for s in samples)
            p99 = statistics.median(s.percentile(0.99) for s in samples)
            commits = statistics.median(s.commits / s.runs for s in samples)
            cpu = statistics.median(s.cpu_ms_per_run for s in samples)
            p50s.setdefault(name, {})[steps] = p50
            lines.append(
                f"  {name:9} {steps:3} {runs:8.1f} {runs * steps:8.0f} {p50:8.2f} {p99:8.2f} "
                f"{commits:12.1f} {cpu:11.2f}"
            )
    counts = [n for n in args.steps if n > 0]
    if 0 not in args.steps or not counts:
        return lines
    lines.append("per-step overhead, (p50(N) - p50(0)) / N, ms")
    lines.append(f"  {'system':9} " + " ".join(f"{f'N={n}':>8}" for n in counts))
    for name, p50 in p50s.items():
        cells = " ".join(f"{(p50[n] - p50[0]) / n:8.3f}" for n in counts)
        lines.append(f"  {name:9} {cells}")
    top = max(counts)
    if "bach" in p50s:
        bach = (p50s["bach"][top] - p50s["bach"][0]) / top
        for name in p50s:
            if name != "bach":
                other = (p50s[name][top] - p50s[name][0]) / top
                lines.append(
                    f"  ratio {name}/bach per-step overhead (N={top}): {other / bach:.1f}"
                    "  (target: at least 5)"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="measured runs per N and round")
    parser.add_argument("--warmup", type=int, default=20, help="runs per N before measuring")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", default="0,2,10", help="child calls per run, comma-separated")
    parser.add_argument("--concurrency", type=int, default=1, help="runs in flight")
    parser.add_argument("--style", choices=("sync", "async"), default="sync")
    parser.add_argument("--systems", default="bach,dbos", help=f"comma-separated: {SYSTEMS}")
    parser.add_argument("--store", help="Bach store URL (default: SQLite in a temp folder)")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # one round, JSON
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in args.systems:
        if name not in SYSTEMS:
            parser.error(f"--systems: unknown system {name!r} {SYSTEMS}")

    if args.only is not None:
        out = run_bach(args) if args.only == "bach" else run_dbos(args, args.only == "dbos-wal")
        print(json.dumps(out))
        return

    print(f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    results: dict[str, dict[int, list[Sample]]] = {name: {} for name in args.systems}
    about: dict[str, str] = {}
    for round_no in range(args.rounds):
        for name in args.systems:
            out = one_round(args, name)
            about[name] = f"{out['label']}: {out['durability']}"
            for steps, sample in out["results"].items():
                results[name].setdefault(int(steps), []).append(Sample(**sample))
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    for text in about.values():
        print(text)
    print("\n".join(report(args, results)))


if __name__ == "__main__":
    main()

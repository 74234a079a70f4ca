"""Autoscaling beside fixed instance counts: a burst of jobs, three systems, one run.

Four `bach serve` systems on their own SQLite stores, one service `work` (a Python
handler sleeping ``--ms`` milliseconds per job):

- auto:   min_instances 1, max_instances ``--max``, idle_timeout ``--idle``
- spawn:  the same, with ``--no-fork-server`` (each new worker a new Python process)
- one:    a fixed single instance
- max:    a fixed ``--max`` instances

Each round sends ``--jobs`` requests of one job to each system in turn (the order
rotating) and times from the first submit until no request is active. Before each
auto round the system has been idle long enough to be back at its minimum, so every
burst starts cold. Medians over ``--rounds``; the ratio auto/max is the target (within
20%), and the instances each system holds when idle are printed too.

    python bench/scaling.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from throughput import HERE, BachSystem, Connection, stop_process


def score(path: Path, low: int, high: int, idle: float) -> Path:
    path.write_text(
        "services:\n"
        f'  work: {{handler: "chain_services:sleep_ms", min_instances: {low},'
        f" max_instances: {high}, idle_timeout: {idle}}}\n"
    )
    return path


def stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/api/stats", timeout=10) as answer:
        return dict(json.load(answer))


async def submit(base: str, jobs: int, ms: int, lanes: int = 16) -> None:
    todo = list(range(jobs))

    async def lane() -> None:
        conn = await Connection.open(base)
        try:
            while todo:
                i = todo.pop()
                status, view = await conn.post(
                    "/api/requests", {"todo": ["work"], "input": {"i": i, "ms": ms}}
                )
                if status != 201:
                    raise SystemExit(f"submit {i}: {status} {view}")
        finally:
            conn.close()

    await asyncio.gather(*(lane() for _ in range(lanes)))


def burst(base: str, jobs: int, ms: int) -> tuple[float, int]:
    """Seconds from the first submit until every request ended; peak instances."""
    started = time.perf_counter()
    asyncio.run(submit(base, jobs, ms))
    peak = 0
    while True:
        figures = stats(base)
        peak = max(peak, figures["services"]["work"]["instances"])
        if figures["active_requests"] == 0:
            if figures["requests"].get("COMPLETE", 0) % jobs:
                raise SystemExit(f"requests did not all complete: {figures['requests']}")
            return time.perf_counter() - started, peak
        # /api/stats reads every active request (tasks still to run): not too often.
        time.sleep(0.1)


def settle(base: str, low: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = int(stats(base)["services"]["work"]["instances"])
        if count <= low:
            return count
        time.sleep(0.2)
    return int(stats(base)["services"]["work"]["instances"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--ms", type=int, default=10)
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--idle", type=float, default=3.0, help="auto's idle_timeout")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="bach-scaling-") as tmp:
        home = Path(tmp)
        setups = {
            "auto": (1, args.max),
            "spawn": (1, args.max),
            "one": (1, 1),
            "max": (args.max, args.max),
        }
        systems: dict[str, BachSystem] = {}
        try:
            for name, (low, high) in setups.items():
                folder = home / name
                folder.mkdir()
                # The handler module sits beside the score, where handlers are looked up.
                (folder / "chain_services.py").write_text((HERE / "chain_services.py").read_text())
                path = score(folder / "score.yaml", low, high, args.idle)
                extra = ["--no-fork-server"] if name == "spawn" else []
                systems[name] = BachSystem(f"sqlite:///{folder}/bach.db", folder, path, *extra)
            times: dict[str, list[float]] = {name: [] for name in setups}
            peaks: dict[str, list[int]] = {name: [] for name in setups}
            idle: dict[str, list[int]] = {name: [] for name in setups}
            order = list(setups)
            for round_no in range(args.rounds):
                turn = round_no % len(order)
                for name in order[turn:] + order[:turn]:
                    low = setups[name][0]
                    idle[name].append(settle(systems[name].base, low, 4 * args.idle + 30))
                    elapsed, peak = burst(systems[name].base, args.jobs, args.ms)
                    times[name].append(elapsed)
                    peaks[name].append(peak)
                print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for system in systems.values():
                stop_process(system.proc)
    print(f"{args.jobs} jobs of {args.ms} ms, burst from idle; medians of {args.rounds} rounds")
    print(f"  {'system':8} {'seconds':>8} {'jobs/s':>8} {'peak inst':>10} {'idle inst':>10}")
    med = {n: statistics.median(t) for n, t in times.items()}
    for name in setups:
        print(
            f"  {name:8} {med[name]:8.2f} {args.jobs / med[name]:8.0f}"
            f" {max(peaks[name]):10d} {min(idle[name]):10d}"
        )
    print(f"  ratio auto/max time: {med['auto'] / med['max']:.2f}  (target: at most 1.20)")
    print(f"  ratio one/auto time: {med['one'] / med['auto']:.2f}")
    print(f"  ratio spawn/max time: {med['spawn'] / med['max']:.2f}  (without the fork server)")


if __name__ == "__main__":
    main()

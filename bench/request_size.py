"""Submission and step time against a request's size, this tree against a baseline.

    .venv/bin/python bench/request_size.py --baseline 8b64b9d [--runs 5] [--cap 60]
        [--store sqlite|redis]

For each shape (chain: each task after the previous; fan-out: every task after one root)
and each size (10, 100, 1,000, 10,000 tasks) it times, in a child process per tree, the
engine on a real store (SQLite in a temporary folder with ``synchronous=normal``, so
that the disk's fsync does not drown the difference; or the Redis at BACH_REDIS_URL,
default 127.0.0.1:6379, under a prefix of its own that is dropped afterwards):

- submit: ``Engine.submit`` of the request (compile, first step, store it);
- step: ``Engine.step`` applying one job's report (read the request, advance it, commit),
  the median over the first 20 completions. The report is put on the completion channel
  before the clock starts.

The baseline runs from a `git worktree` of the given revision. Runs alternate A/B/A/B;
figures are medians; a run over --cap seconds prints "> cap".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (10, 100, 1000, 10_000)
SHAPES = ("chain", "fan-out")
STEPS = 20

CHILD = r"""
import asyncio, json, statistics, sys, tempfile, time, uuid
from pathlib import Path
from bach.backends import open_backend
from bach.backends.port import Report
from bach.core.limits import Limits
from bach.core.score import load_scores
from bach.runtime.engine import Engine, Submission

shape, n, steps, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


async def main(folder):
    tasks = {}
    for i in range(n):
        after = [] if i == 0 else [f"t{i - 1}" if shape == "chain" else "t0"]
        tasks[f"t{i}"] = {"service": "S", "after": after}
    score_file = Path(folder) / "bench.yaml"
    score_file.write_text(json.dumps(
        {"services": {"S": {"handler": "nowhere:f"}}, "rubrics": {"r": {"tasks": tasks}}}
    ))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{folder}/bach.db?synchronous=normal" if store == "sqlite" else (
        f"{store}?prefix={prefix}")
    backend = open_backend(url)
    engine = Engine(backend, load_scores([score_file]), limits=Limits(tasks=n))
    try:
        started = time.perf_counter()
        request, _ = await engine.submit(Submission(input=1, rubric="r"))
        submit = time.perf_counter() - started
        times = []
        leased = []
        for _ in range(steps):
            if not leased:
                leased = await backend.lease("S", "w", time.time(), 600, limit=n)
            if not leased:
                break
            job = leased.pop(0).job
            await backend.report([Report(
                job.id, job.request_id, job.task, job.attempt, True, "1", "w", time.time())])
            started = time.perf_counter()
            await engine.step()
            times.append(time.perf_counter() - started)
        print(json.dumps({"submit": submit, "step": statistics.median(times)}))
    finally:
        await backend.close()
        if store != "sqlite":
            import redis
            client = redis.Redis.from_url(store)
            keys = list(client.scan_iter(f"{prefix}:*"))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])


with tempfile.TemporaryDirectory() as folder:
    asyncio.run(main(folder))
"""


def measure(tree: Path, shape: str, n: int, cap: float, store: str) -> dict[str, float] | None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, shape, str(n), str(STEPS), store],
            env=env, capture_output=True, text=True, timeout=cap, check=True, cwd=tree,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    figures: dict[str, float] = json.loads(out.stdout)
    return figures


def shown(values: list[float] | None, cap: float) -> str:
    if values is None:
        return f"> {cap:g} s"
    median = statistics.median(values)
    return f"{median * 1000:.2f} ms" if median < 1 else f"{median:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a git revision to compare with")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds one run may take")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    args = parser.parse_args()
    store = "sqlite"
    if args.store == "redis":
        store = os.environ.get("BACH_REDIS_URL", "redis://127.0.0.1:6379/0")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.baseline],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            print("| shape | tasks | submit before | submit after | ratio |", end="")
            print(" step before | step after | ratio |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for shape in SHAPES:
                for n in SIZES:
                    runs: dict[str, dict[str, list[float]] | None] = {"A": {}, "B": {}}
                    for _ in range(args.runs):  # A/B/A/B
                        for label, tree in (("A", base), ("B", ROOT)):
                            if runs[label] is None:
                                continue
                            found = measure(tree, shape, n, args.cap, store)
                            if found is None:
                                runs[label] = None
                                continue
                            for name, value in found.items():
                                runs[label].setdefault(name, []).append(value)  # type: ignore[union-attr]
                    cells = []
                    for name in ("submit", "step"):
                        a = None if runs["A"] is None else runs["A"][name]
                        b = None if runs["B"] is None else runs["B"][name]
                        ratio = (
                            f"{statistics.median(a) / statistics.median(b):.1f}x"
                            if a and b
                            else "-"
                        )
                        cells += [shown(a, args.cap), shown(b, args.cap), ratio]
                    print(f"| {shape} | {n:,} | " + " | ".join(cells) + " |", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )


if __name__ == "__main__":
    main()

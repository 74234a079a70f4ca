"""Submission and step time against a request's size, this tree against a baseline.

    .venv/bin/python bench/request_size.py --baseline d20c6ac [--runs 5] [--cap 60]

For each shape (chain: each task after the previous; fan-out: every task after one root)
and each size (10, 100, 1,000, 10,000 tasks) it times, in a child process per tree:

- submit: compile the plan, take the first step (dispatch what is ready) and write the
  stored record, as the engine does on POST /api/requests;
- step: one job's completion applied and the record written again (the mean over the
  first 20 completions).

This is the engine's pure work on a request (bach.core and the record's JSON), without
the store's I/O. The baseline runs from a `git worktree` of the given revision. Runs
alternate A/B/A/B; figures are medians; a run over --cap seconds prints "> cap".
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
import json, sys, time
from bach.core import machine
from bach.core.rubric import _build, _TaskSource
from bach.runtime.codec import to_record

shape, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names = [f"t{i}" for i in range(n)]
if shape == "chain":
    after = {name: (names[i - 1],) if i else () for i, name in enumerate(names)}
else:
    after = {name: (names[0],) if i else () for i, name in enumerate(names)}
policy = (0, 1.0, 1.0, 30.0)

started = time.perf_counter()
sources = [_TaskSource(name, "S", after[name], None, None, policy) for name in names]
plan = _build("bench", sources, None, {})
request = machine.Request(id="r", key="r", plan=plan, input=1, created_at=0.0)
request, effects = machine.advance(request, machine.Started(), 0.0)
to_record(request)
submit = time.perf_counter() - started

queue = [e for e in effects if type(e).__name__ == "Dispatch"]
taken, done = 0.0, 0
while queue and done < steps:
    job = queue.pop(0)
    started = time.perf_counter()
    request, effects = machine.advance(request, machine.JobDone(job.task, 1, 1), 1.0)
    to_record(request)
    taken += time.perf_counter() - started
    done += 1
    queue += [e for e in effects if type(e).__name__ == "Dispatch"]
print(json.dumps({"submit": submit, "step": taken / max(done, 1)}))
"""


def measure(tree: Path, shape: str, n: int, cap: float) -> dict[str, float] | None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, shape, str(n), str(STEPS)],
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
    args = parser.parse_args()
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
                            found = measure(tree, shape, n, args.cap)
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

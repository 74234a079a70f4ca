"""`make demo`: start a Bach system, send it seed 002's examples and seed 004's command
from other processes, print the results with their traces, and stop it.

The system runs on the default store (a SQLite file under ./.bach/).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACH = [sys.executable, "-m", "bach"]
SCORES = ["--score", str(HERE / "arith.yaml"), "--score", str(HERE / "images.yaml")]


def start_system() -> tuple[subprocess.Popen[str], str]:
    serve = subprocess.Popen(
        [*BACH, "serve", *SCORES, "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert serve.stdout is not None
    line = serve.stdout.readline()
    match = re.search(r"http://\S+", line)
    if match is None:
        serve.kill()
        sys.exit(f"demo: the system did not start: {line!r}")
    print(line.strip())
    return serve, match.group(0)


def client(*args: str) -> None:
    command = [*BACH, *args]
    print(f"\n$ bach {' '.join(args)}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    serve, url = start_system()
    try:
        print("\nSeed 002, example 1: A (+2) then B (x2) on 5")
        client("submit", "--todo", "A,B", "--input", "5", "--wait", "--server", url)
        print("\nSeed 002, example 2: B then A on 5")
        client("submit", "--todo", "B,A", "--input", "5", "--wait", "--server", url)
        print("\nClient X's contract (adjust, resize, watermark) on a stand-in image")
        image = '{"name": "cat.jpg", "width": 4000, "height": 3000, "brightness": 0.3}'
        client("submit", "--client", "X", "--input", image, "--wait", "--server", url)
        print("\nSeed 004: CommandOne calls CommandTwo (+2) with its request, adds 1")
        client("command", "run", "CommandOne", "--request", "1", "--wait", "--server", url)
        print("\nA command that calls the score's services A and B as durable steps")
        client("command", "run", "AddThenDouble", "--request", "5", "--wait", "--server", url)
        client("status", "--server", url)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        assert serve.stdout is not None
        print(serve.stdout.read().strip())


if __name__ == "__main__":
    main()

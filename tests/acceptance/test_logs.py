"""Log lines: text or JSON, the job each was emitted in, the same in every process of a
system; and the line ``bach serve`` starts with."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bach.core.score import Score
from bach.runtime.logs import configure, job_context
from bach.runtime.server import banner
from tests.helpers import BACH, EXAMPLES, bach, start_system, stop

TALKER = """
import logging

log = logging.getLogger("talker")


def talk(value):
    log.debug("debug from the handler %s", value)
    log.warning("warning from the handler %s", value)
    return value
"""


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Where configure() sends this test's lines; the root logger as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_json_line_has_the_time_level_logger_message_and_every_extra_field(
    stream: io.StringIO,
) -> None:
    configure("info", "json", stream=stream)
    log = logging.getLogger("bach.engine")
    log.debug("not at INFO")
    log.info(
        "request %s task %s attempt %d failed",
        "r-1",
        "A",
        2,
        extra={"request_id": "r-1", "task": "A", "attempt": 2, "error_type": "KeyError"},
    )
    try:
        raise KeyError("order")
    except KeyError:
        log.exception("two\nlines", extra={"service": "A"})
    first, second = lines(stream)
    assert first["message"] == "request r-1 task A attempt 2 failed"
    assert (first["level"], first["logger"], first["pid"]) == ("INFO", "bach.engine", os.getpid())
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert {k: first[k] for k in ("request_id", "task", "attempt", "error_type")} == {
        "request_id": "r-1",
        "task": "A",
        "attempt": 2,
        "error_type": "KeyError",
    }
    assert second["message"] == "two\nlines" and second["service"] == "A"
    assert "KeyError: 'order'" in second["exc_info"]


def test_records_inside_a_job_context_carry_its_request_task_and_attempt(
    stream: io.StringIO,
) -> None:
    configure("INFO", "json", stream=stream)
    log = logging.getLogger("handler.code")

    def in_thread() -> None:
        log.info("from a thread")

    async def in_task() -> None:
        log.info("from a task")

    async def job() -> None:
        with job_context("r-2", "B#2", 3):
            log.info("inside")
            log.info("own fields win", extra={"task": "mine"})
            await asyncio.create_task(in_task())
            # How a sync handler's thread gets the job: a copy of the context.
            thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
            thread.start()
            thread.join()
        log.info("after")

    asyncio.run(job())
    found = {line["message"]: line for line in lines(stream)}
    for message in ("inside", "from a task", "from a thread"):
        line = found[message]
        assert (line["request_id"], line["task"], line["attempt"]) == ("r-2", "B#2", 3), line
    assert found["own fields win"]["task"] == "mine"
    assert "request_id" not in found["after"] and "task" not in found["after"]


def test_a_text_line_ends_with_the_request_and_task_when_it_has_them(
    stream: io.StringIO,
) -> None:
    configure("INFO", "text", stream=stream)
    log = logging.getLogger("bach.engine")
    with job_context("r-3", "C", 1):
        log.info("in a job")
    log.info("outside")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(f"INFO bach.engine[{os.getpid()}]: in a job request=r-3 task=C")
    assert outside.endswith(": outside")


def test_an_unknown_log_format_or_level_is_bad_usage() -> None:
    for option, value in (("--log-format", "xml"), ("--log-level", "LOUD")):
        done = bach("serve", "--score", str(EXAMPLES / "arith.yaml"), option, value)
        assert done.returncode == 2, done.stderr
        assert value in done.stderr


def test_the_banner_hides_the_store_password_and_says_whether_a_token_is_needed() -> None:
    score = Score(files=["/srv/a.yaml", "/srv/b.yaml"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        line = banner(sock, "redis://bach:s3cret@db:6379/0", score, "tok")
        open_line = banner(sock, "sqlite:///x.db", score, None)
    assert line.startswith(f"bach: serving http://127.0.0.1:{port} ")
    assert "s3cret" not in line and "db:6379/0" in line
    assert "/srv/a.yaml, /srv/b.yaml" in line and "token required" in line
    assert "no token required" in open_line
    assert "\n" not in line


@pytest.mark.slow
def test_bach_serve_starts_with_one_line_naming_url_store_score_and_token(
    tmp_path: Path,
) -> None:
    score = EXAMPLES / "arith.yaml"
    store = f"sqlite:///{tmp_path}/bach.db"
    args = [*BACH, "serve", "--port", "0", "--store", store, "--score", str(score)]
    with open(tmp_path / "serve.log", "w") as stderr:
        proc = subprocess.Popen(
            [*args, "--token", "t0k", "--no-workers"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        url = line.split()[2]
        assert httpx.get(f"{url}/api/stats").status_code == 401  # what the line says
    finally:
        stop(proc)
    assert line.startswith("bach: serving http://127.0.0.1:"), line
    assert f"store {store};" in line and f"score {score};" in line
    assert "token required" in line and "no token" not in line


def talker_system(home: Path) -> Path:
    (home / "talker.py").write_text(TALKER)
    score = home / "score.yaml"
    (home / "shout.py").write_text(
        "import sys\nvalue = sys.stdin.read()\nprint('shouting', value, file=sys.stderr)\n"
        "print(value)\n"
    )
    score.write_text(
        'services:\n  talk: {handler: "talker:talk"}\n  shout: {command: [python3, shout.py]}\n'
    )
    return score


def run_talk(home: Path, *extra: str) -> tuple[list[dict[str, Any]], str, int]:
    """Run one job of ``talk`` on a system started with ``extra``: the system's log
    lines (its workers write theirs to the same stderr), the request id, its pid."""
    env = {"BACH_LOG_FORMAT": "text", "BACH_LOG_LEVEL": "INFO"}  # the options must win
    system = start_system([talker_system(home)], f"sqlite:///{home}/bach.db", home, *extra, env=env)
    try:
        done = httpx.post(
            f"{system.url}/api/requests",
            params={"wait": 20},
            json={"input": 7, "todo": ["talk", "shout"]},
            timeout=60,
        ).json()
        assert done["status"] == "COMPLETE", done
    finally:
        stop(system.process)
    text = system.log.read_text()
    return (
        [json.loads(line) for line in text.splitlines() if line.strip()],
        done["id"],
        (system.process.pid),
    )


@pytest.mark.slow
@pytest.mark.parametrize("spawn", ["--fork-server", "--no-fork-server"])
def test_workers_log_at_the_level_and_in_the_format_of_bach_serve(
    tmp_path: Path, spawn: str
) -> None:
    found, rid, serve_pid = run_talk(
        tmp_path, spawn, "--log-format", "json", "--log-level", "DEBUG"
    )  # every line is JSON, or json.loads above fails
    handler = [line for line in found if line["logger"] == "talker"]
    assert [(line["level"], line["message"]) for line in handler] == [
        ("DEBUG", "debug from the handler 7"),
        ("WARNING", "warning from the handler 7"),
    ]
    assert handler[0]["pid"] != serve_pid  # a worker's line, at the level serve was given
    accepted = [line for line in found if line["logger"] == "bach.engine"]
    assert accepted and accepted[0]["request_id"] == rid and accepted[0]["pid"] == serve_pid


@pytest.mark.slow
def test_a_handlers_own_lines_carry_its_job(tmp_path: Path) -> None:
    found, rid, _ = run_talk(tmp_path, "--log-format", "json")
    line = next(line for line in found if line["logger"] == "talker")
    assert (line["request_id"], line["task"], line["attempt"]) == (rid, "talk", 1)


@pytest.mark.slow
def test_a_programs_stderr_lines_carry_its_job(tmp_path: Path) -> None:
    found, rid, _ = run_talk(tmp_path, "--log-format", "json")
    line = next(line for line in found if "shouting 7" in line["message"])
    assert (line["request_id"], line["task"], line["attempt"]) == (rid, "shout", 1)

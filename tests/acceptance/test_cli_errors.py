"""Issue 12, items 5, 6 and 8 through real `bach` processes: every failure is one line on
stderr with a documented exit status; no traceback; a store password is never shown."""

from __future__ import annotations

import socket
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import drop_prefix, redis_url, require_redis
from tests.helpers import EXAMPLES, FIXTURES, bach, running_system, start_system, stop

pytestmark = pytest.mark.slow

SCORES = [EXAMPLES / "arith.yaml", FIXTURES / "edge.yaml"]


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("text", "words"),
    [("NaN", "NaN is not JSON"), ("{bad", "use --input-text"), ("[1e400]", "too large")],
)
def test_input_must_be_json(text: str, words: str) -> None:
    line = one_line(bach("submit", "--todo", "A", "--input", text), 2)
    assert line.startswith("bach: error: --input") and words in line, line


def test_a_score_that_is_not_text_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "score.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    line = one_line(bach("validate", str(binary)), 2)
    assert str(binary) in line and "not UTF-8" in line
    latin = tmp_path / "latin.yaml"
    latin.write_bytes('services:\n  A: {handler: "caf\xe9:x"}\n'.encode("latin-1"))
    line = one_line(bach("validate", str(latin)), 2)
    assert str(latin) in line and "0xe9" in line


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = bach(
            "serve", "--score", str(EXAMPLES / "arith.yaml"), "--port", port,
            "--store", f"sqlite:///{tmp_path}/bach.db", cwd=tmp_path, timeout=30,
        )  # fmt: skip
    line = one_line(result, 2)
    assert f"cannot listen on 127.0.0.1:{port}" in line, line


def test_listening_beyond_loopback_needs_a_token_or_insecure(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    args = ["serve", "--score", str(EXAMPLES / "arith.yaml"), "--store", store, "--port", "0"]
    line = one_line(bach(*args, "--host", "0.0.0.0", cwd=tmp_path), 2)
    assert "no --token" in line and "--insecure" in line, line
    system = start_system(
        [EXAMPLES / "arith.yaml"], store, tmp_path, "--host", "0.0.0.0", "--insecure"
    )
    try:
        url = system.url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{url}/healthz").json()["ok"] is True
    finally:
        stop(system.process)
    assert "without a token (--insecure)" in system.log.read_text()


def test_a_server_that_cannot_be_reached_is_status_3() -> None:
    line = one_line(bach("get", "some-key", "--server", "http://127.0.0.1:9"), 3)
    assert "cannot reach the Bach server" in line


def test_refs_and_keys_stay_in_their_path_segment(tmp_path: Path) -> None:
    with running_system(
        SCORES, f"sqlite:///{tmp_path}/bach.db", tmp_path, "--max-tasks", "3"
    ) as system:
        server = ["--server", system.url]
        line = one_line(bach("get", "../../api/stats", *server), 2)
        assert "ID_OR_KEY" in line and "'.' at position 0" in line, line
        line = one_line(bach("submit", "--todo", "A", "--input", "1", "--key", "a/b", *server), 2)
        assert "'/' at position 1" in line
        text = bach("submit", "--todo", "echo", "--input-text", "{bad", "--wait", "--json", *server)
        assert text.returncode == 0, text.stderr
        assert '"result": "{bad"' in text.stdout
        line = one_line(bach("submit", "--todo", "A,A,A,A", "--input", "1", *server), 2)
        assert "at most 3" in line and "--max-tasks" in line, line
        failed = bach("submit", "--todo", "neg_inf", "--input", "1", "--wait", *server)
        assert failed.returncode == 1
        missing = one_line(bach("get", "no-such-request", *server), 2)
        assert "no request with id or key 'no-such-request'" in missing


def test_a_bad_limit_is_one_line() -> None:
    line = one_line(bach("serve", "--score", str(EXAMPLES / "arith.yaml"), "--max-body", "lots"), 2)
    assert "--max-body" in line and "not a size" in line, line


def test_a_store_password_is_never_shown(tmp_path: Path) -> None:
    require_redis()
    user, password = f"bachtest{uuid.uuid4().hex[:8]}", f"pw{uuid.uuid4().hex}"
    admin = redis.Redis.from_url(redis_url())
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                      channels=["*"], commands=["+@all"])  # fmt: skip
    prefix = f"bach-test-{uuid.uuid4().hex[:12]}"
    base = redis_url().split("://", 1)[1].rsplit("@", 1)[-1].split("?")[0]
    store = f"redis://{user}:{password}@{base}?prefix={prefix}"
    try:
        for fork in ("--fork-server", "--no-fork-server"):
            system = start_system(SCORES, store, tmp_path, fork)
            try:
                health = httpx.get(f"{system.url}/healthz").json()
                assert health["ok"] is True and password not in health["store"]
                assert f"{user}:***@" in health["store"]
                status = bach("status", "--json", "--server", system.url)
                assert status.returncode == 0 and password not in status.stdout
                workers = [p for p in system.children() if "worker" in " ".join(p.cmdline())]
                assert workers, "no worker processes"
                for proc in workers:  # `bach serve` itself was given --store by us
                    assert password not in " ".join(proc.cmdline())
            finally:
                stop(system.process)
            assert password not in system.log.read_text()
        unreachable = one_line(
            bach("list", "--server", "http://127.0.0.1:9", env={"BACH_STORE": store}), 3
        )
        assert password not in unreachable
    finally:
        admin.acl_deluser(user)
        drop_prefix(prefix)

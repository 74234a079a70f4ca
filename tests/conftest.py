from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from bach.backends import open_backend
from bach.backends.port import Backend

BACKENDS = ["memory", "sqlite", "redis"]


def redis_url() -> str:
    return os.environ.get("BACH_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """Redis must be there in CI; on a laptop without it, Redis tests are skipped."""
    try:
        redis.Redis.from_url(redis_url(), socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {redis_url()} is unreachable in CI: {exc}")
        pytest.skip(f"Redis at {redis_url()} is unreachable: {exc}")


def redis_store(prefix: str) -> str:
    sep = "&" if "?" in redis_url() else "?"
    return f"{redis_url()}{sep}prefix={prefix}"


def drop_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(redis_url())
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own, deleted afterwards."""
    require_redis()
    prefix = f"bach-test-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        drop_prefix(prefix)


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store several processes share: a SQLite file, then a Redis prefix of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bach.db"
    else:
        yield redis_store(request.getfixturevalue("redis_prefix"))


def backend_url(kind: str, tmp_path: Path, prefix: str = "bach") -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/bach.db"
    if kind == "redis":
        return redis_store(prefix)
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    prefix = ""
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
    store = open_backend(backend_url(request.param, tmp_path, prefix))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(autouse=True)
def _no_store_from_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tests choose their store explicitly; a developer's BACH_STORE must not leak in.
    monkeypatch.delenv("BACH_STORE", raising=False)
    yield

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bach.backends import open_backend
from bach.backends.port import Backend

BACKENDS = ["memory", "sqlite"]


def redis_url() -> str:
    return os.environ.get("BACH_REDIS_URL", "redis://127.0.0.1:6379/0")


def backend_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/bach.db"
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    store = open_backend(backend_url(request.param, tmp_path))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(autouse=True)
def _no_store_from_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tests choose their store explicitly; a developer's BACH_STORE must not leak in.
    monkeypatch.delenv("BACH_STORE", raising=False)
    yield

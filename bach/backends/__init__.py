"""Backends by URL: ``memory://``, ``sqlite:///path`` (the default), ``redis://host/db``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from bach.backends.port import Backend
from bach.errors import StoreError

#: Where the default store lives, relative to the working directory.
DEFAULT_STORE = "sqlite:///.bach/bach.db"
SCHEMES = ("memory", "sqlite", "redis")


def store_url(url: str | None = None) -> str:
    """The store to use: the given URL, else ``BACH_STORE``, else the default file."""
    return url or os.environ.get("BACH_STORE") or DEFAULT_STORE


def redact_url(url: str) -> str:
    """A store URL fit to show: the password hidden, the query (options) left out.
    ``redis://app:secret@h:6379/0?x=1`` -> ``redis://app:***@h:6379/0``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" not in netloc:
        return url.split("?")[0]
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, colon, _ = user.partition(":")
        netloc = f"{name}:***@{host}" if colon else f"{name}@{host}" if name else host
        if not colon and name and parts.scheme.startswith("redis"):
            netloc = f"***@{host}"  # redis://secret@host: the only credential is a password
    return f"{parts.scheme}://{netloc}{parts.path}"


def open_backend(url: str | None = None) -> Backend:
    """Open a backend by URL. Imports only the implementation the scheme names."""
    url = store_url(url)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from bach.backends.memory import MemoryBackend

        return MemoryBackend(url)
    if scheme == "sqlite":
        from bach.backends.sqlite import SqliteBackend

        return SqliteBackend(url)
    if scheme in ("redis", "rediss"):
        from bach.backends.redis import RedisBackend

        return RedisBackend(url)
    raise StoreError(
        "store", f"unknown store scheme {scheme!r} in {url!r} (expected {', '.join(SCHEMES)})"
    )


def sqlite_path(url: str) -> Path:
    """The file of an ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise StoreError("store", f"{url!r} names no file (try sqlite:///.bach/bach.db)")
    return Path(path)

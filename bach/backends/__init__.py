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
    """A store URL fit to show: the password hidden, the user kept, the query (options,
    which may hold secrets too) left out. Pure.

    ``redis://app:secret@h:6379/0?x=1`` -> ``redis://app:***@h:6379/0``; a Redis URL with
    one credential (``redis://secret@h``) names a password, so that becomes ``***@h``."""
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:  # no credentials to hide
        return url.split("?", 1)[0].split("#", 1)[0]
    # The last "@" ends the credentials, even when a password holds "/", "?" or "#".
    credentials, _, where = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    if colon:
        shown = f"{user}:***@"
    elif scheme.startswith("redis"):
        shown = "***@"
    else:
        shown = f"{user}@" if user else ""
    return f"{scheme}://{shown}{where.split('?', 1)[0].split('#', 1)[0]}"


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
        "url",
        f"unknown store scheme {scheme!r} in {redact_url(url)!r} (expected {', '.join(SCHEMES)})",
    )


def sqlite_path(url: str) -> Path:
    """The file of an ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise StoreError("url", f"{url!r} names no file (try sqlite:///.bach/bach.db)")
    return Path(path)

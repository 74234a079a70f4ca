"""Doorbells between processes on one machine: Unix datagram sockets in a folder.

A process that waits for a topic binds ``<folder>/<topic>.<pid>.<n>``; ringing sends one
byte to every socket of that topic. Doorbells only cut latency: a lost ring costs one
poll interval, never correctness, so every waiter also wakes on a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import socket
import tempfile
from pathlib import Path

_counter = itertools.count()


def bell_folder(identity: str) -> Path:
    """A short folder (socket paths are limited to 107 bytes) unique to one store."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"bach-{os.getuid()}" / digest


def _topic_name(topic: str) -> str:
    return hashlib.sha256(topic.encode()).hexdigest()[:12]


class Bell:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._listeners: dict[str, tuple[socket.socket, Path, asyncio.Event]] = {}

    def ring(self, topic: str) -> None:
        prefix = _topic_name(topic) + "."
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            if not name.startswith(prefix):
                continue
            path = self.folder / name
            try:
                self._sender.sendto(b"!", str(path))
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    with contextlib.suppress(OSError):
                        path.unlink()  # its process is gone

    def listen(self, topic: str) -> asyncio.Event:
        """Start listening (idempotent); rings from now on are kept until waited for."""
        if topic in self._listeners:
            return self._listeners[topic][2]
        path = self.folder / f"{_topic_name(topic)}.{os.getpid()}.{next(_counter)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock.bind(str(path))
        event = asyncio.Event()

        def drain() -> None:
            with contextlib.suppress(BlockingIOError, OSError):
                while sock.recv(64):
                    pass
            event.set()

        asyncio.get_running_loop().add_reader(sock.fileno(), drain)
        self._listeners[topic] = (sock, path, event)
        return event

    async def wait(self, topic: str, timeout: float) -> None:
        event = self.listen(topic)
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    def close(self) -> None:
        for sock, path, _ in self._listeners.values():
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
        self._listeners.clear()
        self._sender.close()

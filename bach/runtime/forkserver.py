"""A fork server: new worker processes in milliseconds instead of half a second.

A worker spends most of its start-up importing Python modules (about 0.4 s on an idle
machine here, a second or more on two cores already busy with the burst that called for
it). The supervisor therefore starts one template process at boot that imports what a
worker needs and then waits; each new instance is a ``fork()`` of it that goes straight
to ``bach worker``'s own code with its arguments. This is what Android's zygote,
``gunicorn --preload`` and multiprocessing's forkserver do. Only Bach and its libraries
are imported ahead; handler modules are imported by each worker, so user code never
runs in the template.

The template talks to the supervisor over a socket, one JSON object per line:

- supervisor -> server: ``{"spawn": n, "argv": [...], "env": {...}}`` (``env``: variables
  the worker gets besides the template's own, such as the store, kept out of ``ps``)
- server -> supervisor: ``{"spawned": n, "pid": p}`` (or ``{"spawned": n, "error": ...}``),
  then ``{"ready": p}`` once that worker can take jobs, and ``{"exited": p, "status": s}``
  (``s`` as ``asyncio.subprocess.Process.returncode``: negative for a signal).

The template is single-threaded and never starts an event loop, so forking it is safe.
It exits when the supervisor's end of the socket closes; its workers then notice their
parent is gone and drain themselves, as they do when the supervisor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("bach.supervisor")

#: Seconds to wait for the template to fork (it may still be importing at boot).
SPAWN_TIMEOUT = 10.0
#: Exit status of a worker whose parent, the template, died before it: not known.
UNKNOWN_STATUS = 255

#: Modules a worker imports on its way to its first job.
PRELOAD = (
    "bach.cli",
    "bach.runtime.boot",
    "bach.backends.sqlite",
    "bach.backends.redis",
    "uvloop",
    "setproctitle",
)


def serve(fd: int) -> None:
    """The template's loop: fork on request, pass on readiness and exits."""
    from setproctitle import setproctitle

    setproctitle("bach fork-server")
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    _Template(socket.socket(fileno=fd)).run()


class _Template:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        channel.setblocking(True)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(channel, selectors.EVENT_READ, "channel")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "children")
        self.ready_pipes: dict[int, int] = {}  # read end -> pid
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.channel.sendall(json.dumps(message).encode() + b"\n")

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.data == "children":
                    with contextlib.suppress(BlockingIOError):
                        self.wake_r.recv(4096)
                elif key.data == "channel":
                    chunk = self.channel.recv(65536)
                    if not chunk:  # the supervisor is gone or done with us
                        return
                    self.orders(chunk)
                else:  # a worker wrote to (or closed) its ready pipe
                    self.ready(int(key.fd))
            self.reap()

    def orders(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            order = json.loads(line)
            try:
                pid, ready = _fork(
                    order["argv"],
                    [self.channel, self.wake_r, self.wake_w],
                    self.selector,
                    order.get("env", {}),
                )
            except OSError as exc:
                self.send({"spawned": order["spawn"], "error": str(exc)})
                continue
            self.ready_pipes[ready] = pid
            self.selector.register(ready, selectors.EVENT_READ, "ready")
            self.send({"spawned": order["spawn"], "pid": pid})

    def ready(self, fd: int) -> None:
        signalled = os.read(fd, 1)
        self.selector.unregister(fd)
        os.close(fd)
        pid = self.ready_pipes.pop(fd)
        if signalled:
            self.send({"ready": pid})

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


def _fork(
    argv: Sequence[str],
    inherited: Sequence[socket.socket],
    selector: selectors.BaseSelector,
    env: Mapping[str, str],
) -> tuple[int, int]:
    """Fork a worker running ``bach <argv>`` with ``env`` added to its environment;
    returns its pid and its ready pipe."""
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        return pid, ready_r
    # The child: become the worker; never return into the template's loop.
    status = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for key in list(selector.get_map().values()):  # the channel, other ready pipes
            with contextlib.suppress(OSError):
                os.close(key.fd)
        for sock in inherited:
            with contextlib.suppress(OSError):
                os.close(sock.detach())
        with contextlib.suppress(OSError):
            os.close(selector.fileno())  # type: ignore[attr-defined]
        os.close(ready_r)
        parent = os.getppid()
        os.environ.update(env)
        args = [*argv, "--ready-fd", str(ready_w), "--parent-pid", str(parent)]
        from setproctitle import setproctitle

        from bach.cli import main

        # What ps (and the worker's own code) sees: the worker, not the template.
        setproctitle(" ".join(["bach", *argv[:3]]))
        sys.argv = ["bach", *args]

        main.main(args=args, prog_name="bach", standalone_mode=True)
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


class Forked:
    """A process the fork server started, handled like an asyncio subprocess."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: Set to the monotonic time the worker said it can take jobs.
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def exited(self, status: int) -> None:
        self.returncode = status
        self._exited.set()


class ForkServer:
    """The supervisor's side: start the template, ask it for workers."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Forked]] = {}
        self._children: dict[int, Forked] = {}
        self._count = 0
        self._open = False

    @property
    def alive(self) -> bool:
        return self._open and self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        started = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bach.runtime.forkserver",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._open = True
        self._reader_task = asyncio.create_task(self._read(reader), name="forkserver")
        log.info("fork server %d started (%.2f s)", self.process.pid, time.monotonic() - started)

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Forked:
        """A new process running ``bach <argv>`` (plus --ready-fd and --parent-pid), with
        ``env`` added to its environment."""
        if not self.alive or self._writer is None:
            raise OSError("the fork server is not running")
        self._count += 1
        number = self._count
        future = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        try:
            order = {"spawn": number, "argv": list(argv), "env": dict(env or {})}
            self._writer.write(json.dumps(order).encode() + b"\n")
            await self._writer.drain()
            return await asyncio.wait_for(future, SPAWN_TIMEOUT)
        except TimeoutError:
            raise OSError(f"no answer from the fork server in {SPAWN_TIMEOUT:g} s") from None
        finally:
            self._pending.pop(number, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._handle(json.loads(line))
        finally:
            self._open = False
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(OSError("the fork server stopped"))
        # The template is gone. Its workers notice that their parent is gone and drain
        # themselves; until each has, it is alive (and may hold jobs): watch for that.
        if self._children:
            log.warning("fork server stopped; watching its %d worker(s)", len(self._children))
        while self._children:
            for pid in [p for p in self._children if _gone(p)]:
                self._children.pop(pid).exited(UNKNOWN_STATUS)
            await asyncio.sleep(0.2)

    def _handle(self, message: dict[str, Any]) -> None:
        if "spawned" in message:
            future = self._pending.get(message["spawned"])
            if future is not None and not future.done():
                if "pid" in message:
                    # Known from now on, so its readiness or exit, which may come next
                    # on this channel before spawn() resumes, is not missed.
                    child = self._children[message["pid"]] = Forked(message["pid"])
                    future.set_result(child)
                else:
                    future.set_exception(OSError(message.get("error", "fork failed")))
            elif "pid" in message:  # too late: the supervisor started one afresh instead
                with contextlib.suppress(OSError):
                    os.kill(message["pid"], signal.SIGTERM)
        elif "ready" in message:
            up = self._children.get(message["ready"])
            if up is not None and not up.ready.done():
                up.ready.set_result(time.monotonic())
        elif "exited" in message:
            gone = self._children.pop(message["exited"], None)
            if gone is not None:
                gone.exited(message["status"])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


if __name__ == "__main__":
    serve(int(sys.argv[1]))

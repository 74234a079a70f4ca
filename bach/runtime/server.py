"""``bach serve`` and ``bach worker``: the long-running processes.

``serve`` runs the engine loop, the HTTP API and the supervisor in one process; the
workers it supervises are separate processes. SIGTERM (or Ctrl-C) stops it cleanly:
the API stops taking requests, workers finish their jobs or give them back, the engine
applies what was reported, and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import uvicorn

from bach.api.app import create_app
from bach.backends import open_backend, redact_url, store_url
from bach.backends.port import Stats
from bach.commands.runner import CommandRunner, Registry
from bach.core.limits import DEFAULTS, Limits
from bach.core.score import Score
from bach.errors import BachError
from bach.runtime.boot import stop_on_signals
from bach.runtime.engine import Engine, is_dead_local_worker, worker_id
from bach.runtime.supervisor import Supervisor

log = logging.getLogger("bach")


@dataclass(frozen=True)
class ServeOptions:
    store: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    workers: bool = True
    grace: float = 10.0
    #: Seconds ended requests are kept; None keeps them all.
    retain: float | None = None
    #: Cap on worker instances over all services (None: only each service's max).
    max_instances: int | None = None
    #: Plugin modules named on the command line (``--plugin``).
    plugins: tuple[str, ...] = ()
    #: Start worker processes by forking a template that has imported Bach.
    fork_server: bool = True
    #: What clients and services may hand in (bach serve's --max-* options).
    limits: Limits = DEFAULTS
    #: Listen beyond loopback without a token (--insecure).
    insecure: bool = False


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: 127.0.0.0/8, ::1 or localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a host name: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_exposure(host: str, token: str | None, insecure: bool) -> str | None:
    """Refuse to listen beyond loopback without a token, unless told to (``insecure``);
    then the warning to print. Raises BachError naming the reason and the two ways out."""
    if token or is_loopback(host):
        return None
    if not insecure:
        raise BachError(
            "--host",
            f"{host} is reachable from other machines and no --token (BACH_TOKEN) is set;"
            " give a token, or --insecure to listen without one",
        )
    return (
        f"bach: warning: listening on {host} without a token (--insecure): anyone who can"
        " reach the port can submit, cancel and read everything"
    )


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the API, or BachError naming why not (a port in use, a host that
    is not this machine's), before anything else starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise BachError("--host", f"cannot resolve {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise BachError("--port", f"cannot listen on {host}:{port}: {reason.lower()}") from None
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are ours: we stop the workers and the engine too, in order.
        yield


async def serve(
    score: Score,
    options: ServeOptions,
    registry: Registry | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Run the system until SIGTERM; ``sock``: the API's socket, if already bound."""
    warning = check_exposure(options.host, options.token, options.insecure)
    if sock is None:
        sock = listen(options.host, options.port)
    try:
        await _serve(score, options, registry, sock, warning)
    finally:
        sock.close()


async def _serve(
    score: Score,
    options: ServeOptions,
    registry: Registry | None,
    sock: socket.socket,
    warning: str | None,
) -> None:
    store = store_url(options.store)
    backend = open_backend(store)
    engine = Engine(backend, score, retain=options.retain, limits=options.limits)
    engine.commands = CommandRunner(
        backend,
        score,
        registry or Registry(),
        owner=worker_id("engine"),
        clock=engine.clock,
        is_dead=is_dead_local_worker,
        limits=options.limits,
    )
    in_process = store.startswith("memory:")
    supervisor = Supervisor(
        score,
        backend,
        store,
        in_process=in_process,
        grace=options.grace,
        plugins=options.plugins,
        max_total=options.max_instances,
        meter=engine,
        fork_server=options.fork_server,
        limits=options.limits,
    )

    async def instances(stats: Stats) -> dict[str, object]:
        services: dict[str, object] = {}
        for name, group in supervisor.instances.items():
            f = supervisor.figures.get(name)
            cfg = supervisor.policy.configs[name]
            services[name] = {
                "instances": sum(i.active for i in group),
                # Run by the other supervisors on this store (other `bach serve`s).
                "instances_elsewhere": supervisor.elsewhere.get(name, 0),
                "draining": sum(i.alive and i.draining for i in group),
                "min_instances": cfg.min_instances,
                "max_instances": cfg.max_instances,
                "arrival_rate": round(f.rate_short, 3) if f else 0.0,
                "service_time": None
                if f is None or f.service_time is None
                else round(f.service_time, 4),
                "bottleneck": supervisor.policy.bottlenecks.get(name),
                "instance_states": supervisor.states(name, stats.workers),
            }
        if not options.workers:  # no supervisor here: nothing of its own to say
            return {"services": services}
        return {"services": services, "supervisors": supervisor.peers.count}

    app = create_app(
        engine,
        token=options.token,
        stats_extra=instances,
        scaling_events=lambda: list(supervisor.events),
    )
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        # uvicorn's own logging setup off: its lines go through ours (text or JSON).
        log_config=None,
        lifespan="off",
        access_log=False,
    )
    server = _Server(config)
    stop = asyncio.Event()
    stop_on_signals(stop)
    await engine.sweep()  # leases left by a system that died go back first
    if options.workers:
        await supervisor.start()
    tasks = [
        asyncio.create_task(engine.run(), name="engine"),
        asyncio.create_task(server.serve(sockets=[sock]), name="api"),
    ]
    if options.workers:
        tasks.append(asyncio.create_task(supervisor.run(), name="supervisor"))
    while not server.started and not tasks[1].done():
        await asyncio.sleep(0.01)
    if tasks[1].done():
        await _shutdown(server, supervisor, engine, tasks)
        await backend.close()
        raise BachError("--port", f"cannot serve on {options.host}:{options.port}")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(banner(sock, store, score, options.token), flush=True)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    await _shutdown(server, supervisor, engine, tasks)
    stopper.cancel()
    await backend.close()
    print("bach: stopped", flush=True)


def banner(sock: socket.socket, store: str, score: Score, token: str | None) -> str:
    """The line ``bach serve`` starts with: where it listens (first, for scripts), the
    store without its password, the score files, and whether the API wants a token."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    files = ", ".join(score.files) or "none"
    access = "token required" if token else "no token required"
    return (
        f"bach: serving http://{shown}:{port} (store {redact_url(store)}; score {files}; "
        f"{len(score.services)} services, {len(score.rubrics)} rubrics; {access})"
    )


async def _shutdown(
    server: _Server, supervisor: Supervisor, engine: Engine, tasks: Sequence[asyncio.Task[None]]
) -> None:
    server.should_exit = True
    if engine.commands is not None:
        await engine.commands.close()
    await supervisor.stop()
    # Apply what the workers reported while stopping.
    with contextlib.suppress(Exception):
        while await engine.step():
            pass
    engine.stop()
    await asyncio.wait(tasks, timeout=15)
    for task in tasks:
        if not task.done():
            task.cancel()

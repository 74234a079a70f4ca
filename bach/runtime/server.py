"""``bach serve`` and ``bach worker``: the long-running processes.

``serve`` runs the engine loop, the HTTP API and the supervisor in one process; the
workers it supervises are separate processes. SIGTERM (or Ctrl-C) stops it cleanly:
the API stops taking requests, workers finish their jobs or give them back, the engine
applies what was reported, and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import uvicorn

from bach.api.app import create_app
from bach.backends import open_backend, store_url
from bach.backends.port import Stats
from bach.commands.runner import CommandRunner, Registry
from bach.core.limits import DEFAULTS, Limits
from bach.core.score import Score
from bach.errors import StoreError
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


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are ours: we stop the workers and the engine too, in order.
        yield


async def serve(score: Score, options: ServeOptions, registry: Registry | None = None) -> None:
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
        asyncio.create_task(server.serve(), name="api"),
    ]
    if options.workers:
        tasks.append(asyncio.create_task(supervisor.run(), name="supervisor"))
    while not server.started and not tasks[1].done():
        await asyncio.sleep(0.01)
    if tasks[1].done():
        await _shutdown(server, supervisor, engine, tasks)
        await backend.close()
        raise StoreError("port", f"cannot listen on {options.host}:{options.port}")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(
        f"bach: serving http://{host}:{port} (store {store.split('?')[0]}, "
        f"{len(score.services)} services, {len(score.rubrics)} rubrics)",
        flush=True,
    )
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    await _shutdown(server, supervisor, engine, tasks)
    stopper.cancel()
    await backend.close()
    print("bach: stopped", flush=True)


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

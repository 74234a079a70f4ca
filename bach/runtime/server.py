"""``bach serve`` and ``bach worker``: the long-running processes.

``serve`` runs the engine loop, the HTTP API and the supervisor in one process; the
workers it supervises are separate processes. SIGTERM (or Ctrl-C) stops it cleanly:
the API stops taking requests, workers finish their jobs or give them back, the engine
applies what was reported, and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from bach.api.app import create_app
from bach.backends import open_backend, store_url
from bach.commands import command_name
from bach.commands.runner import CommandRunner, Registry
from bach.core.score import Score, Service, ServiceSpec
from bach.errors import NotFound, ScoreError, StoreError
from bach.plugins import Found, discover
from bach.runtime.engine import Engine, is_dead_local_worker, worker_id
from bach.runtime.invoke import check_service
from bach.runtime.supervisor import Supervisor
from bach.runtime.worker import Worker, drain

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


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are ours: we stop the workers and the engine too, in order.
        yield


def load_plugins(score: Score, extra: Sequence[str] = ()) -> tuple[Registry, Found]:
    """Installed plugins, the score's ``plugins`` and ``extra`` modules: their commands
    in a registry, their services added to the score. A plugin that cannot load, or
    clashes with what is already there, is reported as broken; the others load."""
    base = os.path.dirname(os.path.abspath(score.files[0])) if score.files else None
    found = discover([*score.plugins, *extra], base_dir=None if base is None else Path(base))
    registry = Registry()
    good = []
    for plugin in found.plugins:
        try:
            for cls in plugin.commands:
                registry.add(cls, plugin.name)
            for name, spec in plugin.services.items():
                if name in score.services:
                    raise ValueError(f"service {name!r} is already in the score")
                service = Service(
                    name,
                    ServiceSpec.model_validate(spec),
                    plugin.base_dir or Path.cwd(),
                    f"plugin {plugin.name}",
                )
                score.services[name] = service
            good.append(plugin)
        except Exception as exc:
            found.broken.append((plugin.name, getattr(exc, "reason", None) or str(exc)))
    found.plugins = good
    return registry, found


def log_plugins(found: Found) -> None:
    for plugin in found.plugins:
        commands = ", ".join(sorted(command_name(c) for c in plugin.commands)) or "none"
        services = ", ".join(sorted(plugin.services)) or "none"
        log.info(
            "plugin %s (%s): commands %s; services %s",
            plugin.name,
            plugin.origin,
            commands,
            services,
        )
    for name, reason in found.broken:
        log.error("plugin %s is broken and was not loaded: %s", name, reason)


def check_score(score: Score) -> None:
    """Refuse to start with a service that cannot run."""
    issues = [
        found
        for service in score.services.values()
        if (found := check_service(service)) is not None
    ]
    if issues:
        raise ScoreError(issues)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)


def _dump_tasks() -> None:
    """SIGUSR1: log where every task of this process is waiting (for a stuck system)."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


async def serve(score: Score, options: ServeOptions, registry: Registry | None = None) -> None:
    store = store_url(options.store)
    backend = open_backend(store)
    engine = Engine(backend, score, retain=options.retain)
    engine.commands = CommandRunner(
        backend,
        score,
        registry or Registry(),
        owner=worker_id("engine"),
        clock=engine.clock,
        is_dead=is_dead_local_worker,
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
        counters=lambda: (engine.dispatched, engine.completed + engine.failed),
    )

    async def instances() -> dict[str, object]:
        services: dict[str, object] = {}
        for name, group in supervisor.instances.items():
            f = supervisor.figures.get(name)
            cfg = supervisor.policy.configs[name]
            services[name] = {
                "instances": sum(i.alive and not i.draining for i in group),
                "draining": sum(i.alive and i.draining for i in group),
                "min_instances": cfg.min_instances,
                "max_instances": cfg.max_instances,
                "arrival_rate": round(f.rate_short, 3) if f else 0.0,
                "service_time": None
                if f is None or f.service_time is None
                else round(f.service_time, 4),
                "completed": engine.completed[name],
                "failed": engine.failed[name],
                "bottleneck": supervisor.policy.bottlenecks.get(name),
            }
        return {"services": services}

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
    _stop_on_signals(stop)
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


async def run_worker(
    score: Score,
    service: str,
    store: str | None,
    *,
    parent_pid: int | None = None,
    concurrency: int = 1,
    grace: float = 10.0,
    lease: float = 15.0,
    plugins: Sequence[str] = (),
) -> int:
    """Serve one service until SIGTERM. Returns the process exit status."""
    _, loaded = load_plugins(score, plugins)
    for name, reason in loaded.broken:
        log.error("plugin %s is broken and was not loaded: %s", name, reason)
    found = score.services.get(service)
    if found is None:
        known = ", ".join(sorted(score.services)) or "none"
        raise NotFound("service", f"unknown service {service!r} (known: {known})")
    url = store_url(store)
    if url.startswith("memory:"):
        raise StoreError(
            "store", "a worker process needs a shared store (sqlite or redis), not memory://"
        )
    backend = open_backend(url)
    worker = Worker(backend, found, concurrency=concurrency, lease_ttl=lease)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    task = asyncio.create_task(worker.run(parent_pid=parent_pid))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    await drain(worker, task, grace)
    stopper.cancel()
    await backend.close()
    return 3 if worker.tainted else 0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )

"""What every Bach process starts with: signals, plugins, and ``bach worker`` (logging is
``bach.runtime.logs``).

Kept apart from ``server`` so that a worker process does not import the web stack:
it starts in about half the time, which is what a cold start of a service costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from bach.backends import open_backend, store_url
from bach.commands import command_name
from bach.commands.runner import Registry
from bach.core.limits import DEFAULTS, Limits
from bach.core.score import Score, Service, ServiceSpec
from bach.errors import NotFound, ScoreError, StoreError
from bach.plugins import Found, discover
from bach.runtime.invoke import check_service
from bach.runtime.worker import Worker, drain

log = logging.getLogger("bach")


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


def stop_on_signals(stop: asyncio.Event) -> None:
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


async def run_worker(
    score: Score,
    service: str,
    store: str | None,
    *,
    parent_pid: int | None = None,
    concurrency: int | None = None,
    grace: float = 10.0,
    lease: float = 15.0,
    plugins: Sequence[str] = (),
    ready_fd: int | None = None,
    limits: Limits = DEFAULTS,
) -> int:
    """Serve one service until SIGTERM. Returns the process exit status.

    ``ready_fd``: a pipe to write one byte to (and close) once the worker can take jobs,
    which is how the supervisor tells an instance still starting from one that is up."""
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
    # The score's concurrency unless told otherwise (--concurrency).
    jobs = found.spec.concurrency if concurrency is None else concurrency
    worker = Worker(backend, found, concurrency=jobs, lease_ttl=lease, limits=limits)
    worker.supervised = parent_pid is not None
    stop = asyncio.Event()
    stop_on_signals(stop)
    task = asyncio.create_task(worker.run(parent_pid=parent_pid))
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
        with contextlib.suppress(OSError):
            os.close(ready_fd)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    await drain(worker, task, grace)
    stopper.cancel()
    await backend.close()
    return 3 if worker.tainted else 0

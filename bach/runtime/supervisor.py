"""The supervisor owns the worker processes of every service.

At boot it starts each service's instances (one by default) and lets them idle until
work comes; when one dies it gives its jobs back to the queue and starts another. With
the in-process memory store, workers are tasks in this process instead, since no other
process can see that store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bach.backends.port import Backend
from bach.core.score import Score, Service
from bach.runtime.engine import HOST, worker_id
from bach.runtime.worker import Worker, drain

log = logging.getLogger("bach.supervisor")


@dataclass
class Instance:
    service: str
    ident: str
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    worker: Worker | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return self.task is not None and not self.task.done()


class Supervisor:
    def __init__(
        self,
        score: Score,
        backend: Backend,
        store: str,
        *,
        in_process: bool = False,
        grace: float = 10.0,
        plugins: Sequence[str] = (),
    ) -> None:
        self.score = score
        self.plugins = list(plugins)
        self.backend = backend
        self.store = store
        self.in_process = in_process
        self.grace = grace
        self.instances: dict[str, list[Instance]] = {name: [] for name in score.services}
        self._count = 0
        self._stopping = asyncio.Event()
        self._restarts: dict[str, float] = {}

    def _new_id(self, service: str) -> str:
        self._count += 1
        return f"{HOST}:{os.getpid()}:{service}:w{self._count}"

    async def start_instance(self, service: Service) -> Instance:
        ident = self._new_id(service.name)
        instance = Instance(service.name, ident)
        if self.in_process:
            worker = Worker(self.backend, service, ident=ident)
            instance.worker = worker
            instance.task = asyncio.create_task(worker.run(), name=ident)
        else:
            instance.process = await asyncio.create_subprocess_exec(
                *self._command(service.name), start_new_session=True
            )
            # The worker names itself the same way (engine.worker_id), from its own pid,
            # so the engine can tell when it has died.
            instance.ident = worker_id(service.name, instance.process.pid)
        self.instances[service.name].append(instance)
        log.info("started %s", instance.ident)
        return instance

    def _command(self, service: str) -> list[str]:
        cmd = [sys.executable, "-m", "bach", "worker", "--service", service]
        cmd += ["--store", self.store, "--grace", str(self.grace)]
        cmd += ["--parent-pid", str(os.getpid())]
        for file in self.score.files:
            cmd += ["--score", file]
        for plugin in self.plugins:
            cmd += ["--plugin", plugin]
        return cmd

    async def start(self) -> None:
        for service in self.score.services.values():
            for _ in range(service.spec.instances):
                await self.start_instance(service)

    async def run(self, interval: float = 0.5) -> None:
        """Watch the instances; replace those that die, until stop()."""
        while not self._stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def check(self) -> None:
        for name, instances in self.instances.items():
            for instance in [i for i in instances if not i.alive]:
                instances.remove(instance)
                code = instance.process.returncode if instance.process else None
                released = await self.backend.release_worker(instance.ident)
                log.warning(
                    "%s exited (status %s); %d job(s) back on the queue",
                    instance.ident,
                    code,
                    released,
                )
            wanted = self.score.services[name].spec.instances
            if len(instances) < wanted and not self._stopping.is_set():
                # Back off a little if a service keeps dying at start.
                last = self._restarts.get(name, 0.0)
                if time.monotonic() - last >= 1.0:
                    self._restarts[name] = time.monotonic()
                    await self.start_instance(self.score.services[name])

    async def stop(self) -> None:
        """Stop every instance: each finishes its job within the grace period, or gives it
        back to the queue."""
        self._stopping.set()
        everyone = [i for instances in self.instances.values() for i in instances]
        await asyncio.gather(*(self._stop_instance(i) for i in everyone))

    async def _stop_instance(self, instance: Instance) -> None:
        if instance.worker is not None and instance.task is not None:
            await drain(instance.worker, instance.task, self.grace)
            return
        proc = instance.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.grace + 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            await self.backend.release_worker(instance.ident)

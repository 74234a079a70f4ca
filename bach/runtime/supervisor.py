"""The supervisor owns the worker processes of every service.

At boot it starts each service's ``min_instances`` (one by default) and lets them idle
until work comes. Every tick it samples each service (queue, running jobs, arrival rate,
service time) and carries out what the scaling policy (``bach.core.scaling``) decides:
more instances for a backlog, a cold start for a service that is off and has work, and
a slow drain back to the minimum once the work is gone. Only instances holding no job
are drained; one that dies is noticed, its jobs go back to the queue, and the policy
replaces it. With the in-process memory store, workers are tasks in this process.

Worker processes are forked from a template (``bach.runtime.forkserver``), or started as
new Python processes if it is off or gone. Each says when it is ready; until then its
instance is ``starting``, and the time that took is the cold start the policy weighs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bach.backends.port import Backend
from bach.core.limits import DEFAULTS, Limits
from bach.core.scaling import Action, Config, Figures, Peers, Policy
from bach.core.score import Score, Service
from bach.runtime.engine import HOST, worker_id
from bach.runtime.forkserver import ForkServer
from bach.runtime.worker import Worker, drain

log = logging.getLogger("bach.supervisor")

#: Seconds a new instance is assumed to take to start, until one has been measured.
COLD_START = 0.5
#: Seconds a supervisor counts as alive after it last said so (it says so every tick).
PRESENCE_TTL = 5.0


class Meter(Protocol):
    """Per-service figures the supervisor samples (the engine has them)."""

    #: EWMA of the seconds a job runs.
    service_time: dict[str, float]


class Proc(Protocol):
    """A worker process: an asyncio subprocess, or one the fork server started."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    async def wait(self) -> int: ...


@dataclass
class Instance:
    service: str
    ident: str
    process: Proc | None = None
    task: asyncio.Task[None] | None = None
    worker: Worker | None = None
    started: float = field(default_factory=time.monotonic)
    #: When the worker said it can take jobs (None: still starting).
    ready: float | None = None
    draining: bool = False

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return self.task is not None and not self.task.done()

    @property
    def active(self) -> bool:
        """Alive and not draining: an instance that counts toward the service's total."""
        return self.alive and not self.draining


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
        max_total: int | None = None,
        meter: Meter | None = None,
        fork_server: bool = True,
        limits: Limits = DEFAULTS,
    ) -> None:
        self.score = score
        #: Limits the workers apply to results (bach serve's --max-result, --max-depth).
        self.limits = limits
        self.plugins = list(plugins)
        self.backend = backend
        self.store = store
        self.in_process = in_process
        self.grace = grace
        self.instances: dict[str, list[Instance]] = {name: [] for name in score.services}
        self._count = 0
        self._stopping = asyncio.Event()
        self._restarts: dict[str, float] = {}
        self.policy = Policy(
            {
                name: Config(
                    min_instances=svc.spec.low,
                    max_instances=svc.spec.high,
                    idle_timeout=svc.spec.idle_timeout,
                    concurrency=svc.spec.concurrency,
                    # Scale-down looks back over at most half the idle timeout (W <= X).
                    down_window=min(30.0, svc.spec.idle_timeout / 2),
                )
                for name, svc in score.services.items()
            },
            max_total,
        )
        #: Where arrivals and service times come from (the engine).
        self.meter = meter
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.figures: dict[str, Figures] = {}
        self._samples: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._last_activity: dict[str, float] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._died: set[str] = set()
        #: Starts new worker processes by forking a process that has imported Bach.
        self.forks = None if in_process or not fork_server else ForkServer()
        #: Per service: EWMA of the seconds from asking for an instance to its being ready.
        self.startup: dict[str, float] = {}
        #: How this supervisor is known to the others on the store, and where it stands.
        self.ident = f"{HOST}:{os.getpid()}:supervisor"
        self.peers = Peers()
        #: Per service: instances the other supervisors on the store run.
        self.elsewhere: dict[str, int] = {}

    def _new_id(self, service: str) -> str:
        self._count += 1
        return f"{HOST}:{os.getpid()}:{service}:w{self._count}"

    async def start_instance(self, service: Service) -> Instance:
        instance = Instance(service.name, self._new_id(service.name))
        if self.in_process:
            worker = Worker(
                self.backend,
                service,
                ident=instance.ident,
                concurrency=service.spec.concurrency,
                limits=self.limits,
            )
            instance.worker = worker
            instance.task = asyncio.create_task(worker.run(), name=instance.ident)
            instance.ready = instance.started
        else:
            instance.process, ready = await self._spawn(service.name)
            ready.add_done_callback(lambda f: self._on_ready(instance, f))
            # The worker names itself the same way (engine.worker_id), from its own pid,
            # so the engine can tell when it has died.
            instance.ident = worker_id(service.name, instance.process.pid)
        self.instances[service.name].append(instance)
        log.info("started %s", instance.ident)
        return instance

    async def _spawn(self, service: str) -> tuple[Proc, asyncio.Future[float]]:
        """A worker process: forked from the fork server, or started afresh if it is down;
        and when it said it is ready (monotonic time)."""
        argv = self._arguments(service)
        if self.forks is not None and self.forks.alive:
            try:
                child = await self.forks.spawn(argv, self._environment())
                return child, child.ready
            except OSError as exc:
                log.warning("fork server could not start a worker (%s); starting one afresh", exc)
        ready_r, ready_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bach",
                *argv,
                "--parent-pid",
                str(os.getpid()),
                "--ready-fd",
                str(ready_w),
                pass_fds=[ready_w],
                start_new_session=True,
                env={**os.environ, **self._environment()},
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[float] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(ready_r)
            with contextlib.suppress(OSError):
                if os.read(ready_r, 1):  # nothing: it exited before it was ready
                    ready.set_result(time.monotonic())
            os.close(ready_r)

        loop.add_reader(ready_r, readable)
        return process, ready

    def _on_ready(self, instance: Instance, ready: asyncio.Future[float]) -> None:
        if ready.cancelled():
            return
        instance.ready = ready.result()
        took = instance.ready - instance.started
        old = self.startup.get(instance.service)
        self.startup[instance.service] = took if old is None else (old + took) / 2
        log.info("%s ready in %.3f s", instance.ident, took)

    def _arguments(self, service: str) -> list[str]:
        """A worker's command line. The store is not on it (see ``_environment``)."""
        cmd = ["worker", "--service", service, "--grace", str(self.grace)]
        cmd += ["--concurrency", str(self.score.services[service].spec.concurrency)]
        cmd += ["--max-result", str(self.limits.result), "--max-depth", str(self.limits.depth)]
        for file in self.score.files:
            cmd += ["--score", file]
        for plugin in self.plugins:
            cmd += ["--plugin", plugin]
        return cmd

    def _environment(self) -> dict[str, str]:
        """What a worker gets in its environment: the store, whose URL may hold a password
        that ``ps`` would show to every user of the machine if it were an argument."""
        return {"BACH_STORE": self.store}

    async def start(self) -> None:
        if self.forks is not None:
            try:
                await self.forks.start()
            except OSError as exc:
                log.warning("no fork server (%s); workers start as new processes", exc)
        try:
            await self._announce()
        except Exception as exc:  # the first tick will try again
            log.warning("could not tell the store this supervisor is up (%s)", exc)
        # Every supervisor keeps its own min_instances (see bach.core.scaling).
        for service in self.score.services.values():
            for _ in range(service.spec.low):
                await self.start_instance(service)

    async def run(self, interval: float = 0.25) -> None:
        """Watch and scale the instances every ``interval`` seconds, until stop()."""
        while not self._stopping.is_set():
            try:
                await self.check()
                await self.scale()
            except Exception:
                log.exception("supervisor tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def check(self) -> None:
        """Forget instances that exited; give back the jobs of those that died."""
        for instances in self.instances.values():
            for instance in [i for i in instances if not i.alive]:
                instances.remove(instance)
                code = instance.process.returncode if instance.process else None
                released = await self.backend.release_worker(instance.ident)
                if instance.draining and not released:
                    log.info("%s stopped (drained)", instance.ident)
                    continue
                self._died.add(instance.service)
                log.warning(
                    "%s exited (status %s); %d job(s) back on the queue",
                    instance.ident,
                    code,
                    released,
                )

    def states(self, service: str, busy: Mapping[str, int]) -> dict[str, str]:
        """Each live instance of a service: starting, busy (holds jobs, by ``busy``: jobs
        held per worker, as the store has them), idle, or draining."""
        return {i.ident: _state(i, busy) for i in self.instances[service] if i.alive}

    def _rates(self, name: str, now: float, dispatched: int) -> tuple[float, float]:
        """Arrival rates of a service over a short (2 s) and a long (down window) span."""
        samples = self._samples[name]
        samples.append((now, dispatched))
        window = self.policy.configs[name].down_window
        while len(samples) > 2 and samples[0][0] < now - window:
            samples.popleft()

        def rate(seconds: float) -> float:
            old = next((s for s in samples if s[0] >= now - seconds), samples[0])
            return (dispatched - old[1]) / max(now - old[0], 0.5)

        return rate(2.0), rate(window)

    async def scale(self) -> None:
        if self._stopping.is_set():
            return
        now = time.monotonic()
        stats = await self.backend.stats(time.time())
        elsewhere = await self._announce()
        service_times = self.meter.service_time if self.meter else {}
        figures: dict[str, Figures] = {}
        for name, instances in self.instances.items():
            q = stats.queues.get(name)
            queued, running = (q.queued, q.running) if q else (0, 0)
            # Arrivals as the store counts them: every engine's, not only this one's.
            short, long = self._rates(name, now, q.enqueued if q else 0)
            if queued or running or short or name not in self._last_activity:
                self._last_activity[name] = now  # idle time counts from boot or last work
            active = [i for i in instances if i.active]
            oldest = q.oldest_queued_at if q else None
            figures[name] = Figures(
                queued=queued,
                running=running,
                instances=len(active),
                peer_instances=elsewhere.get(name, 0),
                idle_instances=sum(1 for i in active if _state(i, stats.workers) == "idle"),
                rate_short=short,
                rate_long=long,
                service_time=service_times.get(name),
                last_activity=self._last_activity.get(name),
                oldest_queued_age=None if oldest is None else max(0.0, time.time() - oldest),
                cold_start=self.startup.get(name, COLD_START),
            )
        self.figures = figures
        for action in self.policy.decide(figures, now, self.peers):
            await self._carry_out(action, stats.workers)

    async def _announce(self) -> dict[str, int]:
        """Tell the store this supervisor is alive and what it runs; learn where it stands
        among the others on the store. Returns the instances the others run, per service."""
        own = {name: sum(i.active for i in group) for name, group in self.instances.items()}
        wall = time.time()
        members = await self.backend.announce(self.ident, own, wall + PRESENCE_TTL, wall)
        members[self.ident] = own
        order = sorted(members)
        self.peers = Peers(order.index(self.ident), len(order))
        others = [counts for ident, counts in members.items() if ident != self.ident]
        self.elsewhere = {name: sum(c.get(name, 0) for c in others) for name in self.instances}
        return self.elsewhere

    async def _carry_out(self, action: Action, busy: Mapping[str, int]) -> None:
        service = self.score.services[action.service]
        if action.kind == "start":
            if action.service in self._died:
                # Replacing a dead instance: at most once a second, in case it keeps dying.
                if time.monotonic() - self._restarts.get(action.service, -10.0) < 1.0:
                    return
                self._restarts[action.service] = time.monotonic()
                self._died.discard(action.service)
            for _ in range(action.count):
                await self.start_instance(service)
        else:
            idle = [
                i for i in self.instances[action.service] if i.alive and _state(i, busy) == "idle"
            ]
            for instance in sorted(idle, key=lambda i: i.started, reverse=True)[: action.count]:
                instance.draining = True
                task = asyncio.create_task(self._stop_instance(instance))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
        event = {
            "time": time.time(),
            "service": action.service,
            "from": action.before,
            "to": action.after,
            "reason": action.reason,
        }
        self.events.append(event)
        log.info(
            "scaling %s: %d -> %d (%s)", action.service, action.before, action.after, action.reason
        )

    async def stop(self) -> None:
        """Stop every instance: each finishes its job within the grace period, or gives it
        back to the queue."""
        self._stopping.set()
        with contextlib.suppress(Exception):  # the others take over this one's share at once
            await self.backend.announce(self.ident, {}, 0.0, time.time())
        everyone = [i for instances in self.instances.values() for i in instances]
        await asyncio.gather(*(self._stop_instance(i) for i in everyone))
        if self.forks is not None:
            await self.forks.close()

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


def _state(instance: Instance, busy: Mapping[str, int]) -> str:
    if instance.draining:
        return "draining"
    if instance.ready is None:
        return "starting"
    return "busy" if instance.ident in busy else "idle"

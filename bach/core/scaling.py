"""The scaling policy: how many instances each service should have. Pure: no I/O, no clock.

The supervisor samples each service every tick into ``Figures`` and asks
``Policy.decide(figures, now)`` for actions (start N, drain N), which it carries out.
The heuristic follows ``research/anchors-scaling-streaming.md`` (A.8):

- Outstanding work ``W = (queued + running) x S`` (S: service-time EWMA). The backlog
  needs ``ceil(W / (c x H))`` instances to drain within the horizon H (the AWS form),
  the arrival rate ``ceil(rate x S / (c x u))`` (Little's law at utilisation u); never
  more than there is work for.
- Scale up straight to the need (not one at a time), but only when the backlog outlives
  a cold start; a service that is off and has work starts at once (cold start).
- Scale down slowly: to the highest recommendation of the last ``down_window`` seconds,
  at most halving per tick, so waves do not flap; 1 -> 0 (to ``min_instances``) only
  after ``idle_timeout`` seconds with no work at all.
- Under a global cap, every busy service gets one instance first (none starves) and the
  rest goes by outstanding work; an idle instance of another service is reclaimed.
- A bottleneck is a service whose backlog will not drain within H at its maximum, or
  whose oldest queued job is older than 2H.
- Several supervisors on one store (one per ``bach serve`` that runs workers) share the
  system: each decides the same system-wide target from the store's figures and the
  instances all of them run, and starts or drains only its own share of it (``Peers``),
  so two hosts do not both scale up for the same backlog: ``max_instances`` holds for
  the system. ``min_instances`` holds for each supervisor, so every host keeps its warm
  instances and losing one host does not mean a cold start on the others.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The states of a worker instance, in the order ``bach status`` lists them: holding a
#: job, up and holding none, not yet ready, finishing its job before it stops.
INSTANCE_STATES = ("busy", "idle", "starting", "draining")


@dataclass(frozen=True)
class Config:
    """Per-service settings (the score's ``min_instances`` and so on)."""

    min_instances: int = 1
    max_instances: int = 4
    #: Seconds with no work before the service goes down to ``min_instances``.
    idle_timeout: float = 60.0
    #: Jobs one instance runs at once.
    concurrency: int = 1
    #: Seconds within which a backlog should drain.
    horizon: float = 2.0
    utilisation: float = 0.8
    #: Seconds of recommendations a scale-down looks back over.
    down_window: float = 30.0
    #: Service time assumed before the first job has been measured.
    prior_service_time: float = 1.0


@dataclass(frozen=True)
class Figures:
    """One service at one tick."""

    queued: int = 0
    running: int = 0
    #: Instances starting or ready (not draining) that this supervisor runs.
    instances: int = 0
    #: Instances other supervisors on the same store run (as they last said).
    peer_instances: int = 0
    #: Of those, ready and holding no job.
    idle_instances: int = 0
    #: Arrivals per second over a short (about 2 s) and a long (down_window) window.
    rate_short: float = 0.0
    rate_long: float = 0.0
    service_time: float | None = None
    cold_start: float = 0.5
    #: When the service last had a job queued or finished; None if never.
    last_activity: float | None = None
    oldest_queued_age: float | None = None


@dataclass(frozen=True)
class Peers:
    """Where this supervisor stands among the live supervisors of one store."""

    #: Its place in the order of their ids, from 0.
    rank: int = 0
    #: How many there are, itself included.
    count: int = 1

    def share(self, total: int) -> int:
        """This supervisor's part of ``total`` instances (the parts add up to it)."""
        base, extra = divmod(total, self.count)
        return base + (1 if self.rank < extra else 0)


@dataclass(frozen=True)
class Action:
    service: str
    #: "start" or "drain".
    kind: str
    count: int
    before: int
    after: int
    reason: str


@dataclass(frozen=True)
class Need:
    up: int
    down: int
    work: float
    bottleneck: str | None


def need(f: Figures, cfg: Config) -> Need:
    """What the service needs now (``up``) and over the slower window (``down``)."""
    s = f.service_time if f.service_time is not None else cfg.prior_service_time
    c = max(1, cfg.concurrency)
    outstanding = f.queued + f.running
    work = outstanding * s
    backlog = math.ceil(work / (c * cfg.horizon)) if work else 0
    # A rate times a guessed service time is a guess: use the rate once S is measured.
    known = f.service_time is not None
    by_rate_up = math.ceil(f.rate_short * s / (c * cfg.utilisation)) if known else 0
    by_rate_down = math.ceil(f.rate_long * s / (c * cfg.utilisation)) if known else 0
    cap = math.ceil(outstanding / c) + math.ceil(f.rate_short * s / (c * cfg.utilisation))
    floor = 1 if outstanding else 0
    up = min(max(backlog, by_rate_up, floor), max(cap, floor))
    down = min(max(backlog, by_rate_down, floor), max(cap, floor))
    bottleneck = None
    total = f.instances + f.peer_instances
    pressure = work / (c * max(total, 1))
    if pressure > cfg.horizon and total >= cfg.max_instances:
        bottleneck = f"backlog needs {pressure:.1f}s to drain at {total} (max) instances"
    elif f.oldest_queued_age is not None and f.oldest_queued_age > 2 * cfg.horizon:
        bottleneck = f"oldest queued job waited {f.oldest_queued_age:.1f}s"
    return Need(up, down, work, bottleneck)


@dataclass
class _History:
    downs: deque[tuple[float, int]] = field(default_factory=deque)


class Policy:
    """Decides each tick; remembers recent recommendations for slow scale-down."""

    def __init__(self, configs: Mapping[str, Config], max_total: int | None = None) -> None:
        self.configs = dict(configs)
        self.max_total = max_total
        self._history: dict[str, _History] = {name: _History() for name in configs}
        self.bottlenecks: dict[str, str] = {}

    def _window_max(self, service: str, now: float, value: int) -> int:
        history = self._history[service].downs
        history.append((now, value))
        window = self.configs[service].down_window
        while history and history[0][0] < now - window:
            history.popleft()
        return max(v for _, v in history)

    def targets(self, figures: Mapping[str, Figures], now: float) -> dict[str, tuple[int, str]]:
        """Each service's target instance count for the whole system, with the reason,
        before the global cap."""
        out: dict[str, tuple[int, str]] = {}
        self.bottlenecks = {}
        for name, f in figures.items():
            cfg = self.configs[name]
            n = need(f, cfg)
            if n.bottleneck:
                self.bottlenecks[name] = n.bottleneck
            lo, hi = cfg.min_instances, cfg.max_instances
            held = self._window_max(name, now, n.down)
            outstanding = f.queued + f.running
            total = f.instances + f.peer_instances
            idle_for = 0.0
            if not outstanding:
                idle_for = math.inf if f.last_activity is None else now - f.last_activity
            if total == 0 and f.queued:
                out[name] = (_clamp(n.up, max(lo, 1), hi), "cold start: jobs queued, none running")
                self._history[name].downs.append((now, out[name][0]))
            elif n.up > total and n.work / (cfg.concurrency * max(total, 1)) > (
                f.cold_start if total else 0
            ):
                out[name] = (_clamp(n.up, lo, hi), f"backlog {n.work:.2f}s of work")
                # A level scaled up to is held for the down window, like the others.
                self._history[name].downs.append((now, out[name][0]))
            elif idle_for >= cfg.idle_timeout and total > lo:
                out[name] = (lo, f"idle for {cfg.idle_timeout:g}s")
            else:
                keep = max(lo, 1 if idle_for < cfg.idle_timeout else 0)
                target = _clamp(max(keep, held), lo, hi)
                if target < total:
                    target = max(target, total - max(1, total // 2))
                    out[name] = (target, f"load fell over the last {cfg.down_window:g}s")
                elif total < lo:
                    out[name] = (lo, "below min_instances")
                else:
                    out[name] = (total, "")
        return out

    def decide(
        self, figures: Mapping[str, Figures], now: float, peers: Peers = Peers()
    ) -> list[Action]:
        targets = self.targets(figures, now)
        if peers.count > 1:
            targets = {
                name: (
                    max(self.configs[name].min_instances, peers.share(target)),
                    _shared(reason, target, peers),
                )
                for name, (target, reason) in targets.items()
            }
        if self.max_total is not None and sum(t for t, _ in targets.values()) > self.max_total:
            targets = self._share(figures, targets)
        actions = []
        for name, (target, reason) in targets.items():
            f = figures[name]
            if target > f.instances:
                actions.append(
                    Action(name, "start", target - f.instances, f.instances, target, reason)
                )
            elif target < f.instances:
                # Only instances holding no job stop; the rest wait for a later tick.
                count = min(f.instances - target, f.idle_instances)
                if count:
                    after = f.instances - count
                    actions.append(Action(name, "drain", count, f.instances, after, reason))
        return actions

    def _share(
        self, figures: Mapping[str, Figures], targets: dict[str, tuple[int, str]]
    ) -> dict[str, tuple[int, str]]:
        """Fit the targets under the global cap: one for each busy service first, the
        rest by outstanding work (largest remainder), never more than a target."""
        assert self.max_total is not None
        budget = self.max_total
        busy = {n for n, f in figures.items() if f.queued + f.running}
        # Services kept at their minimum by configuration keep it.
        share = {n: min(self.configs[n].min_instances, targets[n][0]) for n in targets}
        for name in sorted(busy, key=lambda n: -need(figures[n], self.configs[n]).work):
            if share[name] == 0 and sum(share.values()) < budget:
                share[name] = 1
        left = budget - sum(share.values())
        works = {n: need(figures[n], self.configs[n]).work for n in busy}
        total = sum(works.values())
        if left > 0 and total > 0:
            raw = {n: left * works[n] / total for n in busy}
            extra = {n: min(int(raw[n]), targets[n][0] - share[n]) for n in busy}
            for name in sorted(busy, key=lambda n: raw[n] - int(raw[n]), reverse=True):
                if sum(extra.values()) >= left:
                    break
                if share[name] + extra[name] < targets[name][0]:
                    extra[name] += 1
            for name in busy:
                share[name] += max(0, extra[name])
        out = {}
        for name, (target, reason) in targets.items():
            capped = min(target, share[name])
            why = reason if capped == target else f"{reason}; global cap {budget}".lstrip("; ")
            out[name] = (capped, why)
        return out


def _shared(reason: str, target: int, peers: Peers) -> str:
    share = f"{peers.share(target)} of {target} here, {peers.count} supervisors"
    return f"{reason}; {share}" if reason else f"sharing the system: {share}"


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))

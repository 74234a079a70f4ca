"""The scaling policy on a fake clock: the research's scenarios (A.9), each checking the
invariants: every job acked once (twice only for one that crashed), no instance stops
holding a job, never work queued with no instance for more than a tick, min <= N <= max."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import pytest

from bach.core.scaling import Action, Config, Figures, Peers, Policy, need

TICK = 0.5
DT = 0.01


@dataclass
class Job:
    id: int
    service: str
    arrives: float
    duration: float
    attempts: int = 0


@dataclass
class Instance:
    ready_at: float
    #: Which supervisor runs it (several share one store).
    owner: int = 0
    job: Job | None = None
    busy_until: float = 0.0
    idle_since: float = 0.0


@dataclass
class Service:
    cfg: Config
    instances: list[Instance] = field(default_factory=list)
    queue: deque[Job] = field(default_factory=deque)
    arrivals: list[float] = field(default_factory=list)
    service_time: float | None = None
    last_activity: float | None = None
    empty_since: float | None = None  # work queued and no instance, since when


class Sim:
    def __init__(
        self,
        configs: dict[str, Config],
        cold_start: float = 0.2,
        max_total: int | None = None,
        start: dict[str, int] | None = None,
        supervisors: int = 1,
    ) -> None:
        self.policies = [Policy(configs, max_total) for _ in range(supervisors)]
        self.policy = self.policies[0]
        self.services = {n: Service(c) for n, c in configs.items()}
        self.cold_start = cold_start
        self.now = 0.0
        self.pending: list[Job] = []
        self.acks: dict[int, int] = {}
        self.attempts: dict[int, int] = {}
        self.events: list[tuple[float, str, int, int, str]] = []
        self.history: dict[str, list[tuple[float, int]]] = {n: [] for n in configs}
        self.ids = itertools.count()
        self.max_total = max_total
        self.crashed = False
        for name, n in (start or {n: c.min_instances for n, c in configs.items()}).items():
            self.services[name].instances = [
                Instance(0.0, owner)
                for owner in range(supervisors)
                for _ in range(Peers(owner, supervisors).share(n))
            ]

    def add(self, service: str, at: float, duration: float, count: int = 1) -> None:
        for _ in range(count):
            self.pending.append(Job(next(self.ids), service, at, duration))
        self.pending.sort(key=lambda j: j.arrives)

    def figures(self, owner: int = 0) -> dict[str, Figures]:
        out = {}
        for name, s in self.services.items():
            mine = [i for i in s.instances if i.owner == owner]
            ready = [i for i in mine if i.ready_at <= self.now]
            short = sum(1 for t in s.arrivals if t > self.now - 2) / 2
            window = s.cfg.down_window
            long = sum(1 for t in s.arrivals if t > self.now - window) / window
            out[name] = Figures(
                queued=len(s.queue),
                running=sum(1 for i in s.instances if i.job),
                instances=len(mine),
                peer_instances=len(s.instances) - len(mine),
                idle_instances=sum(1 for i in ready if i.job is None),
                rate_short=short,
                rate_long=long,
                service_time=s.service_time,
                cold_start=self.cold_start,
                last_activity=s.last_activity,
                oldest_queued_age=self.now - s.queue[0].arrives if s.queue else None,
            )
        return out

    def apply(self, actions: list[Action], owner: int = 0) -> None:
        for a in actions:
            s = self.services[a.service]
            if a.kind == "start":
                s.instances += [Instance(self.now + self.cold_start, owner) for _ in range(a.count)]
            else:
                idle = sorted(
                    (
                        i
                        for i in s.instances
                        if i.owner == owner and i.job is None and i.ready_at <= self.now
                    ),
                    key=lambda i: i.idle_since,
                )
                for inst in idle[: a.count]:
                    assert inst.job is None, "an instance stopped holding a job"
                    s.instances.remove(inst)
            self.events.append((self.now, a.service, a.before, a.after, a.reason))

    def crash(self, service: str) -> None:
        s = self.services[service]
        self.crashed = True
        victim = next(i for i in s.instances if i.job is not None)
        s.instances.remove(victim)
        assert victim.job is not None
        s.queue.appendleft(victim.job)  # its lease is released: back on the queue

    def step(self) -> None:
        poke = False
        while self.pending and self.pending[0].arrives <= self.now:
            job = self.pending.pop(0)
            s = self.services[job.service]
            s.queue.append(job)
            s.arrivals.append(self.now)
            s.last_activity = self.now
            poke |= not s.instances
        for s in self.services.values():
            for inst in s.instances:
                if inst.job is not None and inst.busy_until <= self.now:
                    job, inst.job = inst.job, None
                    self.acks[job.id] = self.acks.get(job.id, 0) + 1
                    self.attempts[job.id] = job.attempts
                    s.service_time = (
                        job.duration
                        if s.service_time is None
                        else 0.8 * s.service_time + 0.2 * job.duration
                    )
                    s.last_activity = inst.idle_since = self.now
                if inst.job is None and inst.ready_at <= self.now and s.queue:
                    inst.job = s.queue.popleft()
                    inst.job.attempts += 1
                    inst.busy_until = self.now + inst.job.duration
        on_tick = round(self.now / DT) % round(TICK / DT) == 0
        if poke or on_tick:
            count = len(self.policies)
            for owner, policy in enumerate(self.policies):
                peers = Peers(owner, count)
                self.apply(policy.decide(self.figures(owner), self.now, peers), owner)
        for name, s in self.services.items():
            n = len(s.instances)
            self.history[name].append((self.now, n))
            assert n <= s.cfg.max_instances, (name, n)
            if self.now > self.cold_start + TICK:  # after boot
                assert n >= s.cfg.min_instances, (name, n, self.now)
            if s.queue and not s.instances:
                s.empty_since = self.now if s.empty_since is None else s.empty_since
                assert self.now - s.empty_since <= TICK, "work queued with no instance"
            else:
                s.empty_since = None
        if self.max_total is not None:
            assert sum(len(s.instances) for s in self.services.values()) <= self.max_total

    def run(self, until: float) -> None:
        while self.now < until:
            self.step()
            self.now = round(self.now + DT, 6)

    def done(self) -> bool:
        return not self.pending and all(
            not s.queue and all(i.job is None for i in s.instances) for s in self.services.values()
        )

    def finished_at(self) -> float:
        while not self.done():
            self.step()
            self.now = round(self.now + DT, 6)
            assert self.now < 600, "never finished"
        return self.now

    def count(self, service: str, at: float) -> int:
        return next(n for t, n in reversed(self.history[service]) if t <= at)

    def events_of(self, service: str) -> list[tuple[float, int, int]]:
        return [(t, a, b) for t, s, a, b, _ in self.events if s == service]

    def assert_acked_once(self, total: int) -> None:
        assert len(self.acks) == total
        assert set(self.acks.values()) == {1}
        assert all(n == 1 for n in self.attempts.values()) or self.crashed


BURST = Config(min_instances=0, max_instances=4, idle_timeout=8, down_window=3)


def test_need_by_backlog_and_by_rate() -> None:
    cfg = Config(max_instances=10)
    assert need(Figures(queued=400, service_time=0.02), cfg).up == 4  # 8 s of work in 2 s
    assert need(Figures(rate_short=10, service_time=0.05), cfg).up == 1  # 0.5 busy -> 1
    assert need(Figures(), cfg).up == 0
    assert need(Figures(queued=1, service_time=100), cfg).up == 1  # never more than work
    # An instance that runs four jobs at once drains four times as fast.
    wide = Config(max_instances=10, concurrency=4)
    assert need(Figures(queued=400, service_time=0.02), wide).up == 1
    assert need(Figures(queued=9, service_time=100), wide).up == 3  # 9 jobs, 4 per instance


def test_1_burst_from_zero_goes_straight_to_max_then_down_in_halves_then_off() -> None:
    sim = Sim({"A": BURST})
    sim.add("A", 0.0, 0.02, 500)
    end = sim.finished_at()
    assert sim.events_of("A")[0] == (0.0, 0, 4)  # not one at a time
    assert end <= 0.2 + 500 * 0.02 / 4 + 2 * TICK + 0.1
    sim.assert_acked_once(500)
    sim.run(end + BURST.idle_timeout + 2)
    downs = [(a, b) for _, a, b in sim.events_of("A")[1:]]
    assert all(b >= a // 2 for a, b in downs), downs  # at most halving per step
    # one tick per halving (4 -> 2 -> 1) once the window has passed
    assert sim.count("A", end + BURST.down_window + 2 * TICK + 0.1) <= 1
    assert sim.count("A", end + BURST.idle_timeout - TICK) == 1
    assert sim.count("A", end + BURST.idle_timeout + TICK + 0.1) == 0
    assert len(downs) <= 4


def test_2_a_single_job_cold_starts_one_instance() -> None:
    sim = Sim({"A": BURST})
    sim.add("A", 1.0, 0.05)
    end = sim.finished_at()
    assert sim.events_of("A")[0] == (1.0, 0, 1)
    assert end <= 1.0 + 0.2 + 0.05 + TICK
    sim.run(end + BURST.idle_timeout + 1)
    assert sim.count("A", sim.now) == 0
    sim.assert_acked_once(1)


def test_3_a_job_arriving_as_the_last_instance_stops_is_served() -> None:
    cfg = Config(min_instances=0, max_instances=2, idle_timeout=1, down_window=1)
    sim = Sim({"A": cfg})
    sim.add("A", 0.0, 0.05)
    sim.run(3.0)
    # The service goes off at the tick where idle reaches the timeout; a job lands then.
    off = next(t for t, a, b in sim.events_of("A") if b == 0)
    sim.add("A", off, 0.05)
    sim.finished_at()
    sim.assert_acked_once(2)  # and the sim asserted no job waited with no instance > 1 tick


def test_4_waves_do_not_flap() -> None:
    cfg = Config(min_instances=0, max_instances=8, idle_timeout=60, down_window=10)
    sim = Sim({"A": cfg})
    for second in range(0, 20, 2):
        for k in range(50):
            sim.add("A", second + k / 50, 0.04)
    sim.run(20)
    events = [(t, a, b) for t, a, b in sim.events_of("A") if t >= 3]
    ups_after_down = False
    seen_down = False
    for _, a, b in events:
        seen_down |= b < a
        ups_after_down |= seen_down and b > a
    assert not ups_after_down, events
    assert len(sim.events_of("A")) <= 4, sim.events_of("A")
    assert min(n for t, n in sim.history["A"] if t > 1) >= 1
    last_burst = 18 + 49 / 50
    sim.run(40)
    first_down_after = [t for t, a, b in sim.events_of("A") if b < a and t > last_burst]
    assert not first_down_after or first_down_after[0] >= last_burst + cfg.down_window - TICK


def test_5_a_steady_trickle_keeps_one_instance() -> None:
    cfg = Config(min_instances=0, max_instances=4, idle_timeout=5, down_window=2)
    sim = Sim({"A": cfg}, start={"A": 1})
    for k in range(200):
        sim.add("A", k / 10, 0.05)
    sim.run(20)
    assert {n for t, n in sim.history["A"]} == {1}
    assert sim.events_of("A") == []


def test_6_long_jobs_are_never_stopped_under_them() -> None:
    cfg = Config(min_instances=0, max_instances=4, idle_timeout=100, down_window=1)
    sim = Sim({"A": cfg}, start={"A": 1})
    for k in range(8):
        sim.add("A", 0.0, 10.0 * (k + 1))
    sim.finished_at()  # the sim asserts no drained instance held a job
    sim.assert_acked_once(8)
    assert max(n for _, n in sim.history["A"]) == 4


def test_7_a_crash_puts_the_job_back_and_the_instance_is_replaced() -> None:
    cfg = Config(min_instances=1, max_instances=2, idle_timeout=100)
    sim = Sim({"A": cfg})
    sim.add("A", 0.0, 1.0, 2)
    sim.run(0.5)
    sim.crash("A")
    sim.finished_at()
    sim.assert_acked_once(2)
    assert sorted(sim.attempts.values()) == [1, 2]  # only the crashed job ran twice


def test_8_global_cap_shares_instances_and_names_the_bottleneck() -> None:
    configs = {"A": Config(min_instances=0, max_instances=4), "B": Config(min_instances=0)}
    sim = Sim(configs, max_total=4)
    sim.add("A", 0.0, 0.02, 400)
    sim.add("B", 0.0, 0.02, 10)
    sim.run(0.02)
    assert (sim.count("A", 0.0), sim.count("B", 0.0)) == (3, 1)  # B is not starved
    sim.run(3.0)
    assert sim.count("A", sim.now) == 4  # B's idle instance went back to A
    sim.finished_at()
    sim.assert_acked_once(410)


def test_8b_the_bottleneck_is_named() -> None:
    policy = Policy({"A": Config(max_instances=2)})
    policy.decide({"A": Figures(queued=400, instances=2, service_time=0.02)}, 0.0)
    assert "A" in policy.bottlenecks and "2 (max)" in policy.bottlenecks["A"]


def test_9_no_scale_up_when_a_cold_start_outlasts_the_backlog() -> None:
    cfg = Config(min_instances=1, max_instances=4, idle_timeout=100)
    sim = Sim({"A": cfg}, cold_start=5.0)
    sim.services["A"].service_time = 0.01
    sim.add("A", 0.0, 0.01, 400)
    sim.finished_at()
    assert max(n for _, n in sim.history["A"]) == 1
    sim.assert_acked_once(400)


@pytest.mark.parametrize("case", ["max1", "min2"])
def test_10_bounds(case: str) -> None:
    if case == "max1":
        sim = Sim({"A": Config(min_instances=0, max_instances=1, idle_timeout=8)})
        sim.add("A", 0.0, 0.02, 500)
        end = sim.finished_at()
        assert max(n for _, n in sim.history["A"]) == 1
        assert 9.5 <= end <= 11.5
    else:
        sim = Sim({"A": Config(min_instances=2, max_instances=4, idle_timeout=2)})
        sim.add("A", 0.0, 0.02, 50)
        sim.run(10)
        assert min(n for _, n in sim.history["A"]) >= 2


def test_11_two_supervisors_share_the_system_not_double_it() -> None:
    sim = Sim({"A": BURST}, supervisors=2)
    sim.add("A", 0.0, 0.02, count=400)
    sim.run(1.0)
    # The same backlog seen by both: two instances each, four in all (max), not eight.
    owners = [i.owner for i in sim.services["A"].instances]
    assert sorted(owners) == [0, 0, 1, 1]
    sim.finished_at()
    sim.run(sim.now + 15)
    assert sim.services["A"].instances == []  # idle: both down to min_instances 0
    sim.assert_acked_once(400)


def test_11b_each_supervisor_keeps_its_minimum_and_a_burst_still_shares_the_maximum() -> None:
    warm = Config(min_instances=1, max_instances=4, idle_timeout=8, down_window=3)
    sim = Sim({"A": warm}, supervisors=2)
    sim.run(2.0)
    assert sorted(i.owner for i in sim.services["A"].instances) == [0, 1]  # both warm
    sim.add("A", 2.0, 0.02, count=400)
    sim.run(3.0)
    assert sorted(i.owner for i in sim.services["A"].instances) == [0, 0, 1, 1]
    sim.finished_at()
    sim.run(sim.now + 15)
    assert sorted(i.owner for i in sim.services["A"].instances) == [0, 1]
    sim.assert_acked_once(400)
    # Supervisor 0 goes (its host died): the other carries on alone, warm.
    sim.services["A"].instances = [i for i in sim.services["A"].instances if i.owner == 1]
    sim.policies.pop(0)
    for instance in sim.services["A"].instances:
        instance.owner = 0  # the one left is number 0 of 1 now
    sim.add("A", sim.now, 0.02, count=400)
    sim.run(sim.now + 1.0)
    assert len(sim.services["A"].instances) == 4
    sim.finished_at()
    sim.assert_acked_once(800)
    assert sum(Peers(rank, 3).share(4) for rank in range(3)) == 4

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bach.core import machine as m
from bach.core.effects import Dispatch, Effect, Fail, Finish, Withdraw
from bach.core.mapping import Template
from bach.core.rubric import Plan, _build, _TaskSource, compile_todo
from bach.core.score import Service, ServiceSpec

POLICY = (2, 1.0, 8.0, 30.0)


def plan_of(
    edges: dict[str, list[str]], inputs: dict[str, Any] | None = None, result: Any = None
) -> Plan:
    inputs = inputs or {}
    sources = [
        _TaskSource(
            name,
            name.upper(),
            tuple(after),
            Template(inputs[name]) if name in inputs else None,
            None,
            POLICY,
        )
        for name, after in edges.items()
    ]
    return _build("test", sources, None if result is None else Template(result), {})


def start(plan: Plan, value: Any = 5) -> tuple[m.Request, list[Effect]]:
    request = m.Request(id="r1", key="k1", plan=plan, input=value, created_at=0.0)
    return m.advance(request, m.Started(), 0.0)


def dispatched(effects: list[Effect]) -> list[str]:
    return [e.task for e in effects if isinstance(e, Dispatch)]


SERVICES = {
    name: Service(name, ServiceSpec(handler="m:f"), __import__("pathlib").Path("."), "s")
    for name in ("A", "B")
}


def run_chain(todo: list[str], value: int) -> m.Request:
    ops = {"A": lambda x: x + 2, "B": lambda x: x * 2}
    request, effects = m.advance(
        m.Request(id="r", key="r", plan=compile_todo(todo, SERVICES), input=value, created_at=0),
        m.Started(),
        0.0,
    )
    while effects:
        effect = effects.pop(0)
        if isinstance(effect, Dispatch):
            request, more = m.advance(
                request,
                m.JobDone(effect.task, effect.attempt, ops[effect.service](effect.input)),
                1.0,
            )
            effects += more
    return request


def test_seed_002_example_1_gives_14() -> None:
    request = run_chain(["A", "B"], 5)
    assert request.status == m.Status.COMPLETE and request.result == 14


def test_seed_002_example_2_gives_12_with_its_trace() -> None:
    request = run_chain(["B", "A"], 5)
    assert request.result == 12
    assert list(request.jobs) == ["B", "A"]
    assert (request.jobs["B"].input, request.jobs["B"].result) == (5, 10)
    assert (request.jobs["A"].input, request.jobs["A"].result) == (10, 12)


def test_todo_may_repeat_a_service() -> None:
    request = run_chain(["A", "B", "A"], 5)
    assert list(request.jobs) == ["A", "B", "A#2"]
    assert request.result == 16


def test_diamond_dispatches_b_and_c_together_and_d_once() -> None:
    plan = plan_of({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    request, effects = start(plan)
    assert dispatched(effects) == ["a"]
    request, effects = m.advance(request, m.JobDone("a", 1, 1), 1.0)
    assert sorted(dispatched(effects)) == ["b", "c"]
    request, effects = m.advance(request, m.JobDone("c", 1, 3), 2.0)
    assert effects == []
    request, effects = m.advance(request, m.JobDone("b", 1, 2), 3.0)
    assert dispatched(effects) == ["d"]
    assert request.jobs["d"].input == {"b": 2, "c": 3}
    request, effects = m.advance(request, m.JobDone("d", 1, 9), 4.0)
    assert effects == [Finish("r1", 9)] and request.status == m.Status.COMPLETE


def test_duplicate_and_stale_reports_change_nothing() -> None:
    plan = plan_of({"a": [], "b": ["a"]})
    request, _ = start(plan)
    after_first, _effects = m.advance(request, m.JobDone("a", 1, 1), 1.0)
    again, more = m.advance(after_first, m.JobDone("a", 1, 1), 2.0)
    assert again is after_first and more == []
    stale, more = m.advance(after_first, m.JobDone("b", 7, 1), 2.0)
    assert stale is after_first and more == []
    unknown, more = m.advance(after_first, m.JobDone("zz", 1, 1), 2.0)
    assert unknown is after_first and more == []


def test_failure_is_retried_with_exponential_backoff_then_fails_the_request() -> None:
    plan = plan_of({"a": []})  # retries=2, backoff=1, max 8
    request, _ = start(plan)
    request, effects = m.advance(request, m.JobFailed("a", 1, "boom"), 10.0)
    assert effects == [Dispatch("r1", "a", 2, "A", 5, 11.0, 30.0)]
    request, effects = m.advance(request, m.JobFailed("a", 2, "boom"), 20.0)
    assert effects == [Dispatch("r1", "a", 3, "A", 5, 22.0, 30.0)]
    request, effects = m.advance(request, m.JobFailed("a", 3, "boom again"), 30.0)
    assert request.status == m.Status.FAILED
    assert isinstance(effects[0], Withdraw) and isinstance(effects[1], Fail)
    assert request.error == {"task": "a", "message": "task 'a' failed after 3 attempts: boom again"}
    assert request.jobs["a"].attempts == 3 and request.jobs["a"].status == m.JobStatus.FAILED


def test_non_retryable_failure_fails_at_once() -> None:
    request, _ = start(plan_of({"a": []}))
    request, _ = m.advance(request, m.JobFailed("a", 1, "bad input", retryable=False), 1.0)
    assert request.status == m.Status.FAILED


def test_backoff_is_capped() -> None:
    sources = [_TaskSource("a", "A", (), None, None, (10, 1.0, 3.0, 30.0))]
    request, _ = start(_build("p", sources, None, {}))
    for attempt in range(1, 5):
        request, effects = m.advance(request, m.JobFailed("a", attempt, "x"), 100.0)
    assert isinstance(effects[0], Dispatch) and effects[0].not_before == 103.0


def test_mapping_that_finds_nothing_fails_the_request_naming_task_and_expression() -> None:
    request, _effects = start(plan_of({"a": []}, inputs={"a": "${input.size}"}), {"x": 1})
    assert request.status == m.Status.FAILED
    assert request.error is not None
    assert "task 'a'" in request.error["message"] and "input.size" in request.error["message"]


def test_mapping_sees_only_upstream_results() -> None:
    plan = plan_of({"a": [], "b": ["a"], "c": []}, inputs={"b": {"up": "${tasks}"}})
    request, _ = start(plan)
    request, _ = m.advance(request, m.JobDone("c", 1, "c-result"), 1.0)
    request, _effects = m.advance(request, m.JobDone("a", 1, "a-result"), 2.0)
    assert request.jobs["b"].input == {"up": {"a": "a-result"}}


def test_result_template() -> None:
    plan = plan_of({"a": [], "b": []}, result={"sum": "${[tasks.a, tasks.b]}"})
    request, _ = start(plan)
    request, _ = m.advance(request, m.JobDone("a", 1, 1), 1.0)
    request, _effects = m.advance(request, m.JobDone("b", 1, 2), 1.0)
    assert request.result == {"sum": [1, 2]}


def test_cancel_withdraws_and_later_reports_are_ignored() -> None:
    request, _ = start(plan_of({"a": []}))
    request, effects = m.advance(request, m.Cancelled(), 1.0)
    assert request.status == m.Status.CANCELLED and effects == [Withdraw("r1")]
    same, more = m.advance(request, m.JobDone("a", 1, 1), 2.0)
    assert same is request and more == []


def test_request_round_trips_through_dict() -> None:
    plan = plan_of({"a": [], "b": ["a"]})
    request, _ = start(plan)
    request, _ = m.advance(request, m.JobDone("a", 1, {"x": [1]}), 1.0)
    again = m.Request.from_dict(request.to_dict(), Plan.from_dict(plan.to_dict()))
    assert again == request
    assert Plan.from_dict(plan.to_dict()).digest == plan.digest


def test_more_than_64_tasks() -> None:
    edges = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(100)}
    request, effects = start(plan_of(edges))
    while effects:
        effect = effects.pop()
        assert isinstance(effect, Dispatch | Finish)
        if isinstance(effect, Dispatch):
            request, more = m.advance(request, m.JobDone(effect.task, 1, 0), 1.0)
            effects += more
    assert request.status == m.Status.COMPLETE and len(request.jobs) == 100
    assert request.plan.by_name["t99"].value == 1 << 99


# -- properties --------------------------------------------------------------------------


def fingerprint(effect: Dispatch) -> str:
    """A result that depends only on the task and its input."""
    shown = sorted(effect.input) if isinstance(effect.input, dict) else effect.input
    return f"{effect.task}:{shown}"


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    n = draw(st.integers(1, 12))
    edges: dict[str, list[str]] = {}
    for i in range(n):
        earlier = [f"t{j}" for j in range(i)]
        edges[f"t{i}"] = (
            draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        )
    return edges


@settings(max_examples=200, deadline=None)
@given(edges=dags(), data=st.data())
def test_any_completion_order_reaches_the_same_state_dispatching_each_task_once(
    edges: dict[str, list[str]], data: st.DataObject
) -> None:
    plan = plan_of(edges, result="${tasks}")
    request, effects = start(plan)
    pending = [e for e in effects if isinstance(e, Dispatch)]
    sent: list[str] = [e.task for e in pending]
    duplicates: list[Dispatch] = []
    finished: list[Effect] = []
    while pending:
        # Pick any outstanding job; sometimes deliver a report twice.
        effect = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
        result = fingerprint(effect)
        request, more = m.advance(request, m.JobDone(effect.task, effect.attempt, result), 1.0)
        if data.draw(st.booleans()):
            duplicates.append(effect)
        for dup in duplicates:
            again, extra = m.advance(request, m.JobDone(dup.task, dup.attempt, "late"), 1.0)
            assert again is request and extra == []
        new = [e for e in more if isinstance(e, Dispatch)]
        sent += [e.task for e in new]
        pending += new
        finished += [e for e in more if isinstance(e, Finish)]
    assert sorted(sent) == sorted(edges)  # each task dispatched exactly once
    assert request.status == m.Status.COMPLETE and len(finished) == 1
    # The final state does not depend on the order: every result is a function of the
    # task's inputs, which come only from upstream results.
    reference, effects = start(plan)
    queue = [e for e in effects if isinstance(e, Dispatch)]
    while queue:
        effect = queue.pop(0)
        result = fingerprint(effect)
        reference, more = m.advance(reference, m.JobDone(effect.task, effect.attempt, result), 1.0)
        queue += [e for e in more if isinstance(e, Dispatch)]
    assert request.result == reference.result
    assert request.done == reference.done == plan.full
    assert {k: (j.input, j.result) for k, j in request.jobs.items()} == {
        k: (j.input, j.result) for k, j in reference.jobs.items()
    }


def test_bad_todo_is_refused() -> None:
    from bach.errors import InvalidInput, NotFound

    with pytest.raises(InvalidInput, match="empty"):
        compile_todo([], SERVICES)
    with pytest.raises(NotFound, match="unknown service 'Z'"):
        compile_todo(["A", "Z"], SERVICES)


# -- attempts on record, retries of a request (issue 13) ---------------------------------


def test_every_attempt_is_on_record_with_what_the_worker_said() -> None:
    request, _ = start(plan_of({"a": []}))
    info = {"worker": "h:1:A", "started_at": 0.5, "error": {"type": "ValueError"}}
    request, _ = m.advance(request, m.JobFailed("a", 1, "ValueError: no", info=info), 1.0)
    request, _ = m.advance(request, m.JobDone("a", 2, 7, info={"worker": "h:2:A"}), 3.0)
    job = request.jobs["a"]
    assert request.status == m.Status.COMPLETE and job.attempts == 2
    assert [(a["attempt"], a["outcome"], a["worker"]) for a in job.history] == [
        (1, "failed", "h:1:A"),
        (2, "ok", "h:2:A"),
    ]
    assert job.history[0]["error"] == {"type": "ValueError"} and job.history[0]["ended_at"] == 1.0
    assert m.Job.from_dict("a", job.to_dict()) == job


def test_lost_deliveries_count_against_the_retries() -> None:
    # POLICY allows 2 retries: 3 attempts in all. Two were lost, so one failure ends it.
    request, _ = start(plan_of({"a": []}))
    lost = [{"worker": "h:9:A", "reason": "worker died", "at": 0.2}] * 2
    request, _ = m.advance(request, m.JobFailed("a", 1, "boom", info={"lost": lost}), 1.0)
    job = request.jobs["a"]
    assert [a["outcome"] for a in job.history] == ["lost", "lost", "failed"]
    assert job.history[0]["reason"] == "worker died"
    assert request.status == m.Status.FAILED and "after 3 attempts" in str(request.error)


def test_backoff_grows_by_its_factor_and_jitter_takes_off_a_fixed_share() -> None:
    task = replace(plan_of({"a": []}).tasks[0], backoff=1.0, backoff_factor=3.0, max_backoff=20.0)
    assert [m.backoff(task, n, "seed") for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 20.0]
    jittery = replace(task, jitter=0.5)
    delays = {m.backoff(jittery, 2, f"r{i}/a/1") for i in range(50)}
    assert all(1.5 <= d <= 3.0 for d in delays) and len(delays) == 50
    assert m.backoff(jittery, 2, "r1/a/1") == m.backoff(jittery, 2, "r1/a/1")


def test_a_failed_request_is_retried_from_its_failed_task_keeping_the_others() -> None:
    plan = plan_of({"a": [], "b": ["a"], "c": ["b"]})
    request, _ = start(plan)
    request, _ = m.advance(request, m.JobDone("a", 1, 1), 1.0)
    request, _ = m.advance(request, m.JobFailed("b", 1, "no", retryable=False), 2.0)
    assert request.status == m.Status.FAILED
    again, effects = m.advance(request, m.Retried(), 3.0)
    assert again.status == m.Status.RUNNING and again.error is None and again.round == 1
    assert [(e.task, e.attempt, e.input) for e in effects if isinstance(e, Dispatch)] == [
        ("b", 2, 1)
    ]
    assert again.jobs["a"] is request.jobs["a"]  # its result is kept, it does not run
    assert again.trace[-1]["event"] == "retried" and again.trace[-1]["tasks"] == ["b"]
    # the new round has its own retries: one failure is retried again
    again, effects = m.advance(again, m.JobFailed("b", 2, "no"), 4.0)
    assert again.status == m.Status.RUNNING and dispatched(effects) == ["b"]
    again, _ = m.advance(again, m.JobDone("b", 3, 2), 5.0)
    again, _ = m.advance(again, m.JobDone("c", 1, 3), 6.0)
    assert again.status == m.Status.COMPLETE and again.result == 3
    assert [a["outcome"] for a in again.jobs["b"].history] == ["failed", "failed", "ok"]


def test_only_an_ended_request_that_did_not_complete_can_be_retried() -> None:
    request, _ = start(plan_of({"a": []}))
    assert m.advance(request, m.Retried(), 1.0) == (request, [])
    cancelled, _ = m.advance(request, m.Cancelled(), 1.0)
    again, effects = m.advance(cancelled, m.Retried(), 2.0)
    assert again.status == m.Status.RUNNING and dispatched(effects) == ["a"]
    assert again.trace[-1]["from"] == "CANCELLED"
    done, _ = m.advance(again, m.JobDone("a", 2, 1), 3.0)
    assert m.advance(done, m.Retried(), 4.0) == (done, [])

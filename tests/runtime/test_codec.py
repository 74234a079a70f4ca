"""How a request is stored in pieces: a step writes the header and the jobs it changed,
and a reader that holds the request applies only those."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bach.backends.port import RequestRecord
from bach.core import machine as m
from bach.runtime.codec import (
    INPUT,
    JOB,
    Held,
    counts_of,
    from_record,
    head_of,
    to_change,
    to_record,
)
from tests.core.test_machine import plan_of, start

#: a fans out to b and c; d needs both
DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def step(request: m.Request, event: m.Event) -> m.Request:
    new, _ = m.advance(request, event, 1.0)
    return replace(new, version=request.version + 1)


def test_a_new_request_is_stored_whole_and_read_back_equal() -> None:
    request, _ = start(plan_of(DIAMOND), {"big": "x" * 1000})
    record, known = to_record(request)
    assert set(record.parts or {}) == {INPUT, JOB + "a"}
    assert "x" * 1000 not in record.body  # the input is a part, not in the header
    assert from_record(record, request.plan).request == request
    assert known.size == len(record.body) + sum(map(len, (record.parts or {}).values()))


def test_a_step_writes_the_header_and_the_jobs_it_changed_only() -> None:
    request, _ = start(plan_of(DIAMOND), {"big": "x" * 1000})
    _, known = to_record(request)
    after_a = step(request, m.JobDone("a", 1, 1))
    record, known_a = to_change(known, after_a)
    # a completed, b and c were dispatched; the input did not change
    assert set(record.parts or {}) == {JOB + "a", JOB + "b", JOB + "c"}
    after_b = step(after_a, m.JobDone("b", 1, 2))
    record_b, known_b = to_change(known_a, after_b)
    assert set(record_b.parts or {}) == {JOB + "b"}
    assert record_b.version == 2 and json.loads(record_b.body)["version"] == 2
    # a reader that holds the request at version 1 applies version 2's parts over it
    assert from_record(record_b, after_a.plan, known_a).request == after_b
    assert known_b.size == from_record(to_record(after_b)[0], after_b.plan).size


def test_a_header_without_parts_is_the_held_request_at_that_version() -> None:
    request, _ = start(plan_of(DIAMOND))
    record, known = to_record(request)
    head = replace(record, parts=None)
    assert from_record(head, request.plan, known) is known
    with pytest.raises(LookupError, match="without its parts"):
        from_record(replace(head, version=1), request.plan, known)


def test_a_record_from_before_the_split_is_read_and_then_written_whole() -> None:
    request, _ = start(plan_of(DIAMOND), [1, 2])
    legacy = RequestRecord(
        request.id,
        request.key,
        request.status.value,
        request.version,
        request.plan.digest,
        json.dumps(request.to_dict()),
        request.created_at,
        request.updated_at,
    )
    known = from_record(legacy, request.plan)
    assert known.request == request and known.whole
    record, _ = to_change(known, step(request, m.JobDone("a", 1, 1)))
    assert set(record.parts or {}) == {INPUT, JOB + "a", JOB + "b", JOB + "c"}
    assert head_of(legacy, request.plan).counts == {"QUEUED": 1}


def test_bitmasks_of_20000_tasks_are_written_in_linear_time() -> None:
    # decimal ints past 4300 digits are refused by Python; hex is not
    chain = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(20_000)}
    request, _ = start(plan_of(chain))
    request = replace(request, done=(1 << 19_999) - 1)
    record, _ = to_record(request)
    assert from_record(record, request.plan).request.done == request.done


def test_counts_while_active_come_from_the_bitmasks_and_once_ended_from_the_jobs() -> None:
    request, _ = start(plan_of(DIAMOND))
    after_a = step(request, m.JobDone("a", 1, 1))
    assert counts_of(after_a) == {"COMPLETE": 1, "QUEUED": 2}
    failed = step(after_a, m.JobFailed("b", 1, "boom", retryable=False))
    assert counts_of(failed) == {"COMPLETE": 1, "FAILED": 1, "CANCELLED": 1}
    record, _ = to_record(failed)
    assert head_of(record, failed.plan).counts == counts_of(failed)


def test_held_requests_are_bounded_and_ended_ones_let_go() -> None:
    held = Held(size=2)
    plan = plan_of(DIAMOND)
    knowns = [to_record(replace(start(plan)[0], id=f"r{i}"))[1] for i in range(3)]
    for known in knowns:
        held.put(known)
    assert len(held) == 2 and held.get("r0") is None and held.get("r2") is knowns[2]
    ended = step(knowns[2].request, m.Cancelled())
    held.put(to_change(knowns[2], ended)[1])
    assert held.get("r2") is None and len(held) == 1

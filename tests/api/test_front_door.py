"""Issue 12's reproducers through a real `bach serve`: what Bach accepts it stores and
reads back; what it cannot, it refuses at the door with the field and the reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from bach.backends.port import RequestRecord
from bach.backends.sqlite import SqliteBackend
from tests.helpers import EXAMPLES, FIXTURES, System, error_of, running_system

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
SCORES = [EXAMPLES / "arith.yaml", FIXTURES / "edge.yaml"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("front")


@pytest.fixture(scope="module")
def system(home: Path) -> Iterator[System]:
    with running_system(SCORES, f"sqlite:///{home}/bach.db", home) as found:
        yield found


@pytest.fixture
def http(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url, timeout=60) as client:
        yield client


def post(http: httpx.Client, text: str | bytes, path: str = "/api/requests") -> httpx.Response:
    data = text.encode() if isinstance(text, str) else text
    return http.post(path, content=data, headers={"content-type": "application/json"})


def listing_works(http: httpx.Client) -> None:
    page = http.get("/api/requests", params={"limit": 1000})
    assert page.status_code == 200, page.text
    assert isinstance(page.json()["requests"], list)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('{"input": NaN, "todo": ["A"]}', "input", "NaN is not JSON"),
        ('{"input": {"a": [1, -Infinity]}, "todo": ["A"]}', "input.a[1]", "-Infinity"),
        ('{"input": 1e400, "todo": ["A"]}', "input", "too large for a double"),
        ('{"input": 1, "todo": ["A"]', "body", "not valid JSON"),
    ],
)
def test_what_is_not_json_is_a_400_naming_the_field(
    http: httpx.Client, text: str, field: str, words: str
) -> None:
    response = post(http, text)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["field"] == field and words in error["reason"], error
    listing_works(http)


def wait_for(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/api/requests", params={"wait": 30}, json=body)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    assert found["status"] in ("COMPLETE", "FAILED"), found
    return found


def test_a_result_that_is_not_json_fails_its_job_for_good(http: httpx.Client) -> None:
    done = wait_for(http, {"todo": ["neg_inf"], "input": 1})
    job = done["jobs"]["neg_inf"]
    assert done["status"] == "FAILED" and job["attempts"] == 1, job  # retries: 2, not used
    assert "result.x" in job["error"] and "-inf is not JSON" in job["error"], job
    printed = wait_for(http, {"todo": ["printer"], "input": {"text": "[1, NaN]"}})
    job = printed["jobs"]["printer"]
    assert printed["status"] == "FAILED" and job["attempts"] == 1, job
    assert "not JSON" in job["error"] and "NaN" in job["error"], job


def test_a_program_printing_too_much_is_stopped(http: httpx.Client) -> None:
    started = time.monotonic()
    done = wait_for(http, {"todo": ["printer"], "input": {"bytes": 50 * MiB}})
    job = done["jobs"]["printer"]
    assert done["status"] == "FAILED" and job["attempts"] == 1, job
    assert "more than 1 MiB" in job["error"] and "--max-result" in job["error"], job
    assert time.monotonic() - started < 20
    fits = wait_for(http, {"todo": ["printer"], "input": {"bytes": MiB - 10}})
    assert fits["status"] == "COMPLETE" and len(fits["result"]) == MiB - 12


def test_a_body_over_the_limit_is_a_413_before_it_is_held(
    system: System, http: httpx.Client
) -> None:
    server = psutil.Process(system.process.pid)
    before = server.memory_info().rss
    big = b'{"todo": ["A"], "input": "' + b"x" * (50 * MiB) + b'"}'
    declared = post(http, big)
    assert declared.status_code == 413, declared.text
    error = error_of(declared)
    assert error["field"] == "body" and "at most 2 MiB" in error["reason"], error
    assert "--max-body" in error["reason"]

    def stream() -> Iterator[bytes]:  # no Content-Length: refused while it streams in
        yield b'{"todo": ["A"], "input": "'
        for _ in range(50):
            yield b"x" * MiB
        yield b'"}'

    streamed = http.post(
        "/api/requests", content=stream(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413, streamed.text
    assert error_of(streamed)["field"] == "body"
    grown = server.memory_info().rss - before
    assert grown < 2 * MiB + MiB, f"the server grew by {grown / MiB:.1f} MiB"
    listing_works(http)


def test_an_input_over_its_limit_is_a_413(http: httpx.Client) -> None:
    response = http.post("/api/requests", json={"todo": ["A"], "input": "é" * (MiB // 2 + 1)})
    assert response.status_code == 413
    error = error_of(response)
    assert error["field"] == "input" and "at most 1 MiB" in error["reason"], error


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("k" * 100_000, "100000 characters long; at most 128"),
        ("a/b", "'/' at position 1"),
        (False, "boolean"),
        ("", "empty"),
        ("../../api/stats", "'.' at position 0"),
    ],
)
def test_keys_that_cannot_be_reached_are_refused(
    http: httpx.Client, key: object, words: str
) -> None:
    for path, body in [
        ("/api/requests", {"todo": ["A"], "input": 1, "key": key}),
        ("/api/commands", {"key": key, "commands": [{"command": "CommandOne", "request": 1}]}),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["field"] == "key" and words in error["reason"], error


def test_every_key_that_is_accepted_is_reachable(http: httpx.Client) -> None:
    for key in [42, "order-17.a_b~c:d@e+f=g,h", "K" * 128]:
        made = http.post("/api/requests", json={"todo": ["A"], "input": 1, "key": key})
        assert made.status_code == 201, made.text
        found = http.get(f"/api/requests/{key}")
        assert found.status_code == 200 and found.json()["key"] == str(key)
        again = http.post("/api/requests", json={"todo": ["A"], "input": 1, "key": key})
        assert again.status_code == 200 and again.json()["id"] == made.json()["id"]


def test_tasks_per_request_are_capped(http: httpx.Client) -> None:
    response = http.post("/api/requests", json={"todo": ["echo"] * 1001, "input": 1})
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "todo" and "at most 1000" in error["reason"], error
    assert "--max-tasks" in error["reason"]


def deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_and_unicode_are_checked_and_the_listing_survives(http: httpx.Client) -> None:
    too_deep = http.post("/api/requests", content=json.dumps({"todo": ["A"], "input": deep(260)}))
    assert too_deep.status_code == 422
    assert "more than 64 levels" in error_of(too_deep)["reason"]
    lone = post(http, '{"todo": ["echo"], "input": {"s": "\\ud800"}}')
    assert lone.status_code == 422
    assert error_of(lone)["field"] == "input.s" and "surrogate" in error_of(lone)["reason"]
    run = post(
        http, '{"commands": [{"command": "CommandOne", "request": "\\udfff"}]}', "/api/commands"
    )
    assert run.status_code == 422 and "surrogate" in error_of(run)["reason"]
    fine = wait_for(http, {"todo": ["echo"], "input": deep(64)})
    assert fine["status"] == "COMPLETE" and fine["result"] == deep(64)
    listing_works(http)


def test_content_types(http: httpx.Client) -> None:
    body = b'{"todo": ["A"], "input": 1}'
    bare = http.post("/api/requests", content=body)  # curl -d: no content type
    assert bare.status_code == 201, bare.text
    vendor = http.post(
        "/api/requests", content=body, headers={"content-type": "application/vnd.x+json"}
    )
    assert vendor.status_code == 201
    text = http.post("/api/requests", content=body, headers={"content-type": "text/plain"})
    assert text.status_code == 415
    assert error_of(text)["field"] == "content-type"


def test_a_405_says_what_is_allowed(http: httpx.Client) -> None:
    response = http.put("/api/requests")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert "error" in response.json()


def test_the_openapi_document_tells_the_truth(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    submit = document["paths"]["/api/requests"]["post"]
    assert {"200", "201", "400", "413", "415", "422"} <= set(submit["responses"])
    schema = submit["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/SubmitBody"}
    assert "CommandCall" in document["components"]["schemas"]
    command = document["paths"]["/api/commands"]["post"]
    assert {"200", "201"} <= set(command["responses"])
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    served = http.get("/metrics")
    assert served.headers["content-type"].startswith("text/plain")


def test_listing_items_are_summaries_and_pages_follow(http: httpx.Client) -> None:
    big = "y" * (MiB - 100)
    ids = [wait_for(http, {"todo": ["echo"], "input": big})["id"] for _ in range(3)]
    page = http.get("/api/requests", params={"limit": 2})
    assert page.status_code == 200
    assert len(page.content) < 10_000
    body = page.json()
    first = body["requests"][0]
    assert first["id"] == ids[-1] and "input" not in first
    assert first["status"] == "COMPLETE" and first["jobs"] == {"COMPLETE": 1}
    assert first["result_preview"].startswith('"yyy') and len(first["result_preview"]) <= 200
    nxt = http.get("/api/requests", params={"limit": 2, "before": body["next"]}).json()
    assert nxt["requests"][0]["id"] == ids[0]


def test_records_from_before_the_limits_do_not_break_reads(home: Path, http: httpx.Client) -> None:
    """Records stored by a Bach without these checks: an input 300 levels deep (it reads
    back), a lone surrogate (shown as an escape), JSON too deep for any parser and text
    that is not JSON (named as unreadable); the listing still works."""
    made = wait_for(http, {"todo": ["A"], "input": 1})

    async def poison() -> None:
        backend = SqliteBackend(f"sqlite:///{home}/bach.db")
        try:
            record = await backend.load(made["id"])
            assert record is not None and record.parts is not None
            # the single body of a record from before requests were stored in parts
            body = json.loads(record.body)
            body.update(id="old-1", key="old-1", input="INPUT", counts=None)
            body.update(done=int(body["done"], 16), dispatched=int(body["dispatched"], 16))
            body["jobs"] = {"A": json.loads(record.parts["job:A"])}
            body["jobs"]["A"]["result"] = "bad \udc80"
            text = json.dumps(body)
            old = RequestRecord(
                "old-1",
                "old-1",
                "COMPLETE",
                1,
                record.plan_id,
                text.replace('"INPUT"', json.dumps(deep(300))),
                record.created_at + 0.001,
                record.updated_at,
                0,
            )
            await backend.create(old, record.plan_id, "{}", [])
            broken = RequestRecord(
                "old-2",
                "old-2",
                "COMPLETE",
                1,
                record.plan_id,
                text.replace('"INPUT"', "[" * 50_000 + "]" * 50_000),
                record.created_at + 0.002,
                record.updated_at,
                0,
            )
            await backend.create(broken, record.plan_id, "{}", [])
        finally:
            await backend.close()

    asyncio.run(poison())
    shown = http.get("/api/requests/old-1")
    assert shown.status_code == 200, shown.text
    assert shown.json()["input"] == deep(300)
    assert shown.json()["jobs"]["A"]["result"] == "bad \\udc80"
    too_deep = http.get("/api/requests/old-2")
    assert too_deep.status_code == 500
    assert error_of(too_deep)["type"] == "UnreadableRecord"
    assert "RecursionError" in error_of(too_deep)["reason"]
    page = http.get("/api/requests", params={"limit": 1000})
    assert page.status_code == 200, page.text
    items = {item["id"]: item for item in page.json()["requests"]}
    assert items["old-1"]["status"] == "COMPLETE"
    assert "RecursionError" in items["old-2"]["unreadable"]


def test_health_answers_while_the_largest_request_is_accepted(tmp_path: Path) -> None:
    with (
        running_system(SCORES, f"sqlite:///{tmp_path}/bach.db", tmp_path, "--no-workers") as s,
        httpx.Client(base_url=s.url, timeout=60) as http,
    ):
        body = {"todo": ["echo"] * 1000, "input": "z" * (MiB - 100)}
        answers: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answers.append(http.post("/api/requests", json=body))
        )
        slowest = 0.0
        sender.start()
        while sender.is_alive():
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.005)
        sender.join()
        assert answers[0].status_code == 201, answers[0].text
        assert slowest < 0.1, f"/healthz took {slowest * 1000:.0f} ms"


def test_sigterm_is_honoured_while_a_large_request_is_accepted(tmp_path: Path) -> None:
    with (
        running_system(SCORES, f"sqlite:///{tmp_path}/bach.db", tmp_path, "--no-workers") as system,
        httpx.Client(base_url=system.url, timeout=60) as http,
    ):
        body = {"todo": ["echo"] * 1000, "input": "z" * (MiB - 100)}

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server may stop first
                http.post("/api/requests", json=body)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.05)
        asked = time.monotonic()
        system.process.terminate()
        system.process.wait(timeout=20)
        took = time.monotonic() - asked
        sender.join()
        assert system.process.returncode == 0
        assert took < 10, f"bach serve took {took:.1f} s to stop"


def test_text_that_is_not_unicode_never_poisons_the_store(
    shared_store: str, tmp_path: Path
) -> None:
    """On SQLite and on Redis (whose scripts decode JSON too): an error message or a
    result holding a lone surrogate is stored readably or refused, and the system goes on."""
    with (
        running_system(SCORES, shared_store, tmp_path) as system,
        httpx.Client(base_url=system.url, timeout=60) as http,
    ):
        failed = wait_for(http, {"todo": ["bad_error"], "input": 1})
        assert failed["status"] == "FAILED"
        assert failed["jobs"]["bad_error"]["error"] == "ValueError: cannot read \\udc80 here"
        refused = wait_for(http, {"todo": ["bad_result"], "input": 1})
        job = refused["jobs"]["bad_result"]
        assert refused["status"] == "FAILED" and job["attempts"] == 1, job
        assert "result[1]" in job["error"] and "lone surrogate" in job["error"], job
        nan = post(http, '{"todo": ["echo"], "input": [NaN]}')
        assert nan.status_code == 400 and error_of(nan)["field"] == "input[0]"
        lone = post(http, '{"todo": ["echo"], "input": "\\ud800"}')
        assert lone.status_code == 422
        after = wait_for(http, {"todo": ["echo", "A"], "input": 1})
        assert after["status"] == "COMPLETE" and after["result"] == 3
        listing_works(http)


def test_a_request_that_grows_past_its_limit_fails_with_the_reason(http: httpx.Client) -> None:
    """Each echo keeps a 1 MiB input and a 1 MiB result: the eighth or so would take the
    request past 16 MiB, so that job fails and the request stops growing."""
    done = wait_for(http, {"todo": ["echo"] * 20, "input": "w" * (MiB - 100)})
    assert done["status"] == "FAILED"
    failed = [name for name, job in done["jobs"].items() if job["status"] == "FAILED"]
    assert len(failed) == 1 and 5 <= int(failed[0].rpartition("#")[2]) <= 10, failed
    error = done["jobs"][failed[0]]["error"]
    assert "at most 16 MiB" in error and "--max-request" in error, error
    listing_works(http)

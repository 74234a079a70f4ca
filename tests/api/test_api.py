"""The HTTP API through a real `bach serve` on a real port, with real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import EXAMPLES, FIXTURES, System, error_of, running_system

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    home = tmp_path_factory.mktemp("api")
    store = f"sqlite:///{home}/bach.db"
    with running_system(
        [EXAMPLES / "arith.yaml", FIXTURES / "svc.yaml"],
        store,
        home,
        env={"BACH_TEST_LOG": str(home / "calls.log")},
    ) as found:
        yield found


@pytest.fixture
def http(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url, timeout=30) as client:
        yield client


def test_seed_002_example_2_trace(http: httpx.Client) -> None:
    response = http.post(
        "/api/requests", params={"wait": 20}, json={"input": 5, "todo": ["B", "A"]}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "COMPLETE" and body["result"] == 12
    assert body["tasks"] == ["B", "A"]
    assert {
        k: (v["input"], v["result"], v["status"], v["attempts"]) for k, v in body["jobs"].items()
    } == {"B": (5, 10, "COMPLETE", 1), "A": (10, 12, "COMPLETE", 1)}


def test_get_by_id_and_by_key_and_wait(http: httpx.Client) -> None:
    created = http.post("/api/requests", json={"input": 5, "todo": ["A", "B"], "key": "k-1"})
    assert created.status_code == 201 and created.json()["key"] == "k-1"
    rid = created.json()["id"]
    done = http.get(f"/api/requests/{rid}", params={"wait": 20}).json()
    assert done["status"] == "COMPLETE" and done["result"] == 14
    assert http.get("/api/requests/k-1").json()["id"] == rid


def test_same_key_returns_the_existing_request(http: httpx.Client) -> None:
    first = http.post("/api/requests", json={"input": 1, "todo": ["A"], "key": "dup"})
    again = http.post("/api/requests", json={"input": 1, "todo": ["A"], "key": "dup"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["input"] == 1


def test_the_same_key_with_another_body_is_a_conflict(http: httpx.Client) -> None:
    first = http.post("/api/requests", json={"input": 1, "todo": ["A"], "key": "dup2"})
    other = http.post("/api/requests", json={"input": 2, "todo": ["A"], "key": "dup2"})
    assert first.status_code == 201 and other.status_code == 409
    error = other.json()["error"]
    assert error["field"] == "key" and "'dup2'" in error["reason"]
    assert first.json()["id"] in error["reason"]


def test_rubric_and_client_requests(http: httpx.Client) -> None:
    by_rubric = http.post(
        "/api/requests", params={"wait": 20}, json={"rubric": "add_then_double", "input": 5}
    ).json()
    assert by_rubric["result"] == 14 and by_rubric["rubric"] == "add_then_double"
    by_client = http.post(
        "/api/requests", params={"wait": 20}, json={"client": "acme", "input": {"size": 4}}
    ).json()
    assert by_client["result"] == "measure(4)" and by_client["client"] == "acme"


def test_list_filters_by_status(http: httpx.Client) -> None:
    http.post("/api/requests", params={"wait": 20}, json={"input": 1, "todo": ["A"]})
    listed = http.get("/api/requests", params={"status": "COMPLETE", "limit": 5}).json()
    assert 1 <= len(listed["requests"]) <= 5
    assert {r["status"] for r in listed["requests"]} == {"COMPLETE"}


def test_cancel(http: httpx.Client) -> None:
    slow = http.post("/api/requests", json={"rubric": "slow3", "input": 1}).json()
    cancelled = http.delete(f"/api/requests/{slow['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    again = http.delete(f"/api/requests/{slow['id']}")
    assert again.status_code == 409 and error_of(again)["field"] == "status"


@pytest.mark.parametrize(
    ("body", "status", "field", "reason"),
    [
        ({"rubric": "nope", "input": 1}, 404, "rubric", "unknown rubric 'nope'"),
        ({"client": "nobody", "input": 1}, 404, "client", "unknown client 'nobody'"),
        ({"todo": ["A", "Z"], "input": 1}, 404, "todo", "unknown service 'Z'"),
        ({"todo": [], "input": 1}, 422, "todo", "empty"),
        ({"input": 1}, 422, "rubric", "exactly one of"),
        ({"rubric": "sized", "input": {"width": 1}}, 422, "input (task measure)", "input.size"),
        ({"todo": "A", "input": 1}, 422, "todo", "valid list"),
        ({"todo": ["A"], "inptu": 1}, 422, "inptu", "unknown field"),
        ([1, 2], 422, "body", "JSON object"),
    ],
)
def test_bad_requests_get_a_json_error_naming_the_field(
    http: httpx.Client, body: object, status: int, field: str, reason: str
) -> None:
    response = http.post("/api/requests", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["field"] == field and reason in error["reason"], error


def test_a_body_that_is_not_json_is_a_400(http: httpx.Client) -> None:
    response = http.post(
        "/api/requests", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["field"] == "body"
    assert "not valid JSON" in error_of(response)["reason"]


def test_unknown_request_and_route_are_json_404s(http: httpx.Client) -> None:
    missing = http.get("/api/requests/no-such-thing")
    assert missing.status_code == 404 and "no-such-thing" in error_of(missing)["reason"]
    assert http.get("/api/nothing-here").status_code == 404
    assert "error" in http.get("/api/nothing-here").json()


def test_the_system_keeps_serving_after_bad_input(http: httpx.Client) -> None:
    for _ in range(3):
        http.post("/api/requests", content=b"\xff\xfe")
        http.post("/api/requests", json={"rubric": "nope"})
    ok = http.post("/api/requests", params={"wait": 20}, json={"input": 1, "todo": ["A"]})
    assert ok.json()["result"] == 3


def test_stats_health_and_docs(http: httpx.Client) -> None:
    stats = http.get("/api/stats").json()
    assert {"active_requests", "active_tasks", "queued_tasks", "services"} <= set(stats)
    assert stats["services"]["A"]["instances"] == 1
    assert {"queued", "running"} <= set(stats["services"]["B"])
    health = http.get("/healthz").json()
    assert health["ok"] is True and health["store"].startswith("sqlite:///")
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/api/requests", "/api/requests/{ref}", "/api/stats"} <= set(paths)


def test_a_token_protects_the_api(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bach.db"
    with (
        running_system(
            [EXAMPLES / "arith.yaml"], store, tmp_path, "--token", "s3cret", "--no-workers"
        ) as found,
        httpx.Client(base_url=found.url) as client,
    ):
        refused = client.get("/api/stats")
        assert refused.status_code == 401 and error_of(refused)["field"] == "authorization"
        allowed = client.get("/api/stats", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        assert client.get("/healthz").status_code == 200


# -- durable commands (seed 004) --------------------------------------------------------


def test_seed_004_command_answers_at_once_then_completes(http: httpx.Client) -> None:
    body = {"key": 0, "commands": [{"command": "CommandOne", "request": 1}]}
    answer = http.post("/api/commands", json=body)
    assert answer.status_code == 201, answer.text
    state = answer.json()
    assert set(state) >= {"id", "status", "children"} and state["key"] == "0"
    one = state["children"]["CommandOne"]
    assert set(one) >= {"id", "status", "command", "name", "request", "response", "children"}
    assert (one["command"], one["request"]) == ("CommandOne", 1)
    done = http.get(f"/api/commands/{state['id']}", params={"wait": 10}).json()
    assert done["status"] == "COMPLETE"
    one = done["children"]["CommandOne"]
    assert (one["status"], one["response"]) == ("COMPLETE", 4)
    two = one["children"]["CommandTwo"]
    assert (two["status"], two["request"], two["response"]) == ("COMPLETE", 1, 3)
    again = http.post("/api/commands", json=body)
    assert again.status_code == 200 and again.json()["id"] == state["id"]
    assert http.get("/api/commands/0").json()["id"] == state["id"]  # by key


def test_a_command_calls_score_services_as_durable_steps(http: httpx.Client) -> None:
    body = {"commands": [{"command": "AddThenDouble", "request": 5}]}
    state = http.post("/api/commands", params={"wait": 20}, json=body).json()
    assert state["status"] == "COMPLETE", state
    node = state["children"]["AddThenDouble"]
    assert node["response"] == 14
    assert {n: (c["service"], c["response"]) for n, c in node["children"].items()} == {
        "A": ("A", 7),
        "B": ("B", 14),
    }


def test_command_errors_name_the_field(http: httpx.Client) -> None:
    unknown = http.post("/api/commands", json={"commands": [{"command": "Nope"}]})
    assert unknown.status_code == 404
    assert error_of(unknown)["field"] == "command" and "'Nope'" in error_of(unknown)["reason"]
    malformed = http.post("/api/commands", json={"commands": [{"request": 1}]})
    assert malformed.status_code == 422 and "command" in error_of(malformed)["field"]
    empty = http.post("/api/commands", json={"commands": []})
    assert empty.status_code == 422
    not_json = http.post(
        "/api/commands", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    assert http.get("/api/commands/no-such-run").status_code == 404
    looping = http.post(
        "/api/commands",
        params={"wait": 10},
        json={"commands": [{"command": "LoopingCommand", "request": 2}]},
    ).json()
    assert looping["children"]["LoopingCommand"]["response"] == 5  # 2 + 3

from __future__ import annotations

from pathlib import Path

import pytest

from bach.core.score import load_scores
from bach.errors import ScoreError

GOOD = """
services:
  A: {handler: "arith:add_two"}
  B: {command: [python3, double.py], retries: 1}
rubrics:
  chain:
    tasks:
      add: {service: A, input: "${input}", output: added}
      double: {service: B, after: [add], input: "${added}"}
clients:
  X: chain
  Y: {rubric: chain, params: {watermark: acme}}
"""


def write(tmp_path: Path, text: str, name: str = "score.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def issues_of(tmp_path: Path, text: str, name: str = "score.yaml") -> list[str]:
    with pytest.raises(ScoreError) as err:
        load_scores([write(tmp_path, text, name)])
    return [str(i) for i in err.value.issues]


def test_good_score_loads_and_compiles(tmp_path: Path) -> None:
    score = load_scores([write(tmp_path, GOOD)])
    assert set(score.services) == {"A", "B"}
    plan = score.rubrics["chain"]
    assert [t.name for t in plan.tasks] == ["add", "double"]
    assert plan.by_name["double"].req_state == plan.by_name["add"].value
    assert plan.by_name["double"].retries == 1
    assert score.clients["X"].rubric == "chain"
    assert score.clients["Y"].params == {"watermark": "acme"}
    assert score.services["A"].base_dir == tmp_path


def test_json_scores_load_too(tmp_path: Path) -> None:
    text = (
        '{"services": {"A": {"handler": "m:f"}},'
        ' "rubrics": {"r": {"tasks": {"a": {"service": "A"}}}}}'
    )
    score = load_scores([write(tmp_path, text, "s.json")])
    assert list(score.rubrics) == ["r"]


def test_unknown_service_names_file_rubric_task_and_field(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace("service: B", "service: Q"))
    assert len(found) == 1
    assert "score.yaml" in found[0]
    assert "rubric 'chain'" in found[0] and "task 'double'" in found[0]
    assert "field 'service'" in found[0] and "unknown service 'Q'" in found[0]


def test_unknown_after_and_cycle(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace("after: [add]", "after: [nope]"))
    assert "unknown task 'nope'" in found[0] and "field 'after'" in found[0]
    cyclic = GOOD.replace(
        'add: {service: A, input: "${input}"',
        'add: {service: A, after: [double], input: "${input}"',
    )
    found = issues_of(tmp_path, cyclic)
    assert "cycle: add -> double -> add" in found[0]


def test_mapping_that_reads_a_task_not_upstream(tmp_path: Path) -> None:
    text = GOOD.replace(
        'add: {service: A, input: "${input}", output: added}',
        'add: {service: A, input: "${tasks.double}", output: added}',
    )
    found = issues_of(tmp_path, text)
    assert any(
        "task 'add'" in f and "reads task 'double'" in f and "not upstream" in f for f in found
    )


def test_mapping_that_reads_an_unknown_name(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace('"${added}"', '"${inptu.x}"'))
    assert "reads 'inptu'" in found[0] and "field 'input'" in found[0]


def test_bad_expression_syntax(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace('"${added}"', '"${added.[}"'))
    assert "bad expression" in found[0] and "task 'double'" in found[0]


def test_duplicate_names_in_yaml_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace("  B: {command", '  A: {handler: "x:y"}\n  B: {command')
    found = issues_of(tmp_path, text)
    assert "duplicate name 'A'" in found[0]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, GOOD, "one.yaml")
    second = write(tmp_path, 'services:\n  A: {handler: "m:f"}\n', "two.yaml")
    with pytest.raises(ScoreError) as err:
        load_scores([first, second])
    assert "service 'A' is already declared in" in str(err.value)


def test_service_needs_exactly_one_kind(tmp_path: Path) -> None:
    found = issues_of(tmp_path, 'services:\n  A: {handler: "m:f", command: [x]}\n')
    assert "service 'A'" in found[0] and "exactly one of 'handler' or 'command'" in found[0]
    found = issues_of(tmp_path, 'services:\n  A: {handler: "nocolon"}\n')
    assert "module:function" in found[0]


def test_unknown_field_is_named(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace("after: [add]", "after: [add], retrys: 3"))
    assert (
        "task 'double'" in found[0] and "field 'retrys'" in found[0] and "unknown field" in found[0]
    )


def test_client_with_unknown_rubric(tmp_path: Path) -> None:
    found = issues_of(tmp_path, GOOD.replace("X: chain", "X: nochain"))
    assert "client 'X': unknown rubric 'nochain'" in found[0]


def test_every_issue_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = GOOD.replace("service: B", "service: Q").replace("X: chain", "X: nochain")
    assert len(issues_of(tmp_path, text)) == 2


def test_output_key_clash(tmp_path: Path) -> None:
    text = GOOD.replace(
        'after: [add], input: "${added}"}', 'after: [add], input: "${added}", output: added}'
    )
    found = issues_of(tmp_path, text)
    assert "output key 'added' is already used by task 'add'" in found[0]


def test_not_yaml(tmp_path: Path) -> None:
    found = issues_of(tmp_path, "services: [unclosed")
    assert "not valid YAML/JSON" in found[0]


def test_an_unclosed_expression_names_file_rubric_task_and_field(tmp_path: Path) -> None:
    text = GOOD.replace('"${added}"', '{size: "${added"}').replace(
        "  chain:\n", '  chain:\n    result: "${tasks.double"\n'
    )
    found = [f.removeprefix(f"{tmp_path}/") for f in issues_of(tmp_path, text)]
    assert found == [
        "score.yaml, rubric 'chain', task 'double', field 'input.size': the '${' of "
        "'${added' is not closed: end the expression with '}' (or write '$${' for a "
        "literal '${')",
        "score.yaml, rubric 'chain', field 'result': the '${' of '${tasks.double' is not "
        "closed: end the expression with '}' (or write '$${' for a literal '${')",
    ]


PARAMS = """
services:
  A: {handler: "m:f"}
rubrics:
  stamp:
    tasks:
      mark: {service: A, input: {text: "${params.watermark}", font: "${?params.font}"}}
    result: {by: "${params.owner}", image: "${tasks.mark}"}
"""


def test_a_client_without_a_param_its_rubric_reads_is_named(tmp_path: Path) -> None:
    clients = (
        "clients:\n"
        "  X: {rubric: stamp, params: {watermark: ACME}}\n"
        "  Y: {rubric: stamp, params: {watermark: Y, owner: Y}}\n"
    )
    found = [f.removeprefix(f"{tmp_path}/") for f in issues_of(tmp_path, PARAMS + clients)]
    assert found == [
        "score.yaml, field 'params': client 'X' does not define param 'owner', which "
        "rubric 'stamp' reads (${params.owner} in its result; defined: watermark)"
    ]


def test_a_client_in_another_file_is_checked_against_the_rubric_it_uses(
    tmp_path: Path,
) -> None:
    rubrics = write(tmp_path, PARAMS, "rubrics.yaml")
    clients = write(tmp_path, "clients:\n  Z: stamp\n", "clients.yaml")
    with pytest.raises(ScoreError) as err:
        load_scores([rubrics, clients])
    found = [str(i).removeprefix(f"{tmp_path}/") for i in err.value.issues]
    assert len(found) == 2 and all(f.startswith("clients.yaml,") for f in found)
    assert "client 'Z' does not define param 'watermark'" in found[0]
    assert "${params.watermark} in task 'mark'" in found[0]
    assert "client 'Z' does not define param 'owner'" in found[1]
    good = write(tmp_path, "clients:\n  Z: {rubric: stamp, params: {watermark: a, owner: b}}\n")
    assert load_scores([rubrics, good]).clients["Z"].params["owner"] == "b"

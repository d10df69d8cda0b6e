"""The generated CRD: no drift from the models, the names users type, and a structural schema.

Pure unit tests: no servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from conftest import ROOT
from taskflow.api.crd import crd, render
from taskflow.api.durations import format_ms, parse_duration_ms

CRD_PATH = ROOT / "crds" / "taskflow.dev_taskflows.yaml"


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd()


@pytest.fixture(scope="module")
def version(generated: dict[str, Any]) -> dict[str, Any]:
    versions = generated["spec"]["versions"]
    assert len(versions) == 1
    return dict(versions[0])


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return dict(version["schema"]["openAPIV3Schema"])


def nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node (a dict with a type or schema keywords), with its path."""
    if isinstance(node, dict):
        yield path, node
        for name, sub in (node.get("properties") or {}).items():
            yield from nodes(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from nodes(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from nodes(node["additionalProperties"], f"{path}{{}}")
        for key in ("anyOf", "allOf", "oneOf"):
            for i, sub in enumerate(node.get(key) or ()):
                yield from nodes(sub, f"{path}<{key}{i}>")


def walk_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_keys(item)


# -- drift --------------------------------------------------------------------------------------


def test_checked_in_crd_matches_the_models() -> None:
    assert CRD_PATH.read_text() == render(), (
        f"{CRD_PATH.relative_to(ROOT)} drifted from operator/taskflow/api: run make generate"
    )


def test_render_is_valid_yaml_of_crd() -> None:
    assert yaml.safe_load(render()) == crd()
    assert render() == render()


# -- names --------------------------------------------------------------------------------------


def test_names_and_scope(generated: dict[str, Any]) -> None:
    assert generated["apiVersion"] == "apiextensions.k8s.io/v1"
    assert generated["kind"] == "CustomResourceDefinition"
    assert generated["metadata"]["name"] == "taskflows.taskflow.dev"
    spec = generated["spec"]
    assert spec["group"] == "taskflow.dev"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == "Taskflow"
    assert names["listKind"] == "TaskflowList"
    assert names["plural"] == "taskflows"
    assert names["singular"] == "taskflow"
    assert names["shortNames"] == ["tf"]


def test_version_served_stored_with_status_subresource(version: dict[str, Any]) -> None:
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Stage", "Progress", "Suspended", "Age"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Stage"]["jsonPath"] == ".status.currentStage"
    assert columns["Progress"]["jsonPath"] == ".status.progress"
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    for name in ("Phase", "Stage", "Progress"):
        assert columns[name]["type"] == "string"


def test_spec_is_required_and_stages_too(schema: dict[str, Any]) -> None:
    assert schema["required"] == ["spec"]
    spec = schema["properties"]["spec"]
    assert "required" not in spec  # stages, or a templateRef to take them from (CEL)
    rules = {r["message"] for r in spec["x-kubernetes-validations"]}
    assert "a flow needs stages, or a templateRef to take them from" in rules
    assert set(spec["properties"]) == {
        "options",
        "context",
        "inputs",
        "stages",
        "cancel",
        "retry",
        "suspend",
        "ttl",
        "templateRef",
    }


# -- structural schema --------------------------------------------------------------------------


def test_schema_has_no_refs_or_defs(schema: dict[str, Any]) -> None:
    keys = set(walk_keys(schema))
    assert "$ref" not in keys
    assert "$defs" not in keys
    assert "title" not in keys


def test_no_anyof_with_types(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key) or ():
                assert "type" not in sub, f"{path}: {key} carries a type"


def test_every_node_has_a_type_or_is_int_or_string_or_free(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        if "<" in path:
            continue  # inside anyOf/allOf: value validations only
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path or '<root>'} has no type"
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path


def test_every_object_has_properties_or_preserves_unknown_fields(schema: dict[str, Any]) -> None:
    objects = 0
    for path, node in nodes(schema):
        if node.get("type") != "object":
            continue
        objects += 1
        if path == ".metadata":
            continue  # the API server fills in ObjectMeta's schema
        # A map (additionalProperties with a schema) is structural too, e.g. status.parent.
        is_map = isinstance(node.get("additionalProperties"), dict)
        assert (
            node.get("properties") or node.get("x-kubernetes-preserve-unknown-fields") or is_map
        ), f"{path}: an object needs properties or x-kubernetes-preserve-unknown-fields"
        if is_map:
            assert "properties" not in node, f"{path}: properties and additionalProperties"
    assert objects > 10


def test_free_form_fields_preserve_unknown_fields(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    task = spec["stages"]["items"]["properties"]["tasks"]["items"]["properties"]
    for node in (spec["context"], task["params"], task["taskflow"]):
        assert node["type"] == "object"
        assert node["x-kubernetes-preserve-unknown-fields"] is True


def test_no_null_defaults_or_unsupported_keywords(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        assert node.get("nullable") in (None, False), path
        if "default" in node:
            assert node["default"] is not None, path
        assert node.get("additionalProperties") in (None, False) or isinstance(
            node.get("additionalProperties"), dict
        ), path


def test_stage_and_task_lists_are_maps_keyed_by_name(schema: dict[str, Any]) -> None:
    stages = schema["properties"]["spec"]["properties"]["stages"]
    tasks = stages["items"]["properties"]["tasks"]
    for node, most in ((stages, 50), (tasks, 1000)):
        assert node["x-kubernetes-list-type"] == "map"
        assert node["x-kubernetes-list-map-keys"] == ["name"]
        assert node["maxItems"] == most
    assert tasks["minItems"] == 1  # (stages: at least one, or a templateRef: a CEL rule)


def test_durations_are_int_or_string_with_bounds(schema: dict[str, Any]) -> None:
    options = schema["properties"]["spec"]["properties"]["options"]["properties"]
    for name in ("timeout", "retryDelay", "maxAge"):
        node = options[name]
        assert node["x-kubernetes-int-or-string"] is True
        assert node["minimum"] == 0
        assert node["maximum"] == 7 * 24 * 3_600_000
        assert node["pattern"] == "^([0-9]+(ms|s|m|h))+$"
        rules = [v["rule"] for v in node["x-kubernetes-validations"]]
        assert any("duration('168h')" in rule for rule in rules)


def test_cel_rules_present(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    messages = " | ".join(v["message"] for v in spec["x-kubernetes-validations"])
    assert "stages are immutable" in messages
    assert "retry.stages names a stage" in messages
    task = spec["properties"]["stages"]["items"]["properties"]["tasks"]["items"]
    task_messages = {v["message"] for v in task["x-kubernetes-validations"]}
    assert task_messages == {
        "taskDetails is required when type is ACTION",
        "taskflow is required when type is TASKFLOW",
        "taskflow is only allowed when type is TASKFLOW",
        "forEach is only allowed when type is ACTION",
    }


def test_status_vocabulary(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]
    assert status["type"] == "object"
    assert status["properties"]["phase"]["enum"] == [
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
        "COMPLETED_WITH_FAILURES",
        "FAILED",
        "CANCELLED",
    ]
    task = status["properties"]["stages"]["items"]["properties"]["tasks"]["items"]
    assert task["properties"]["status"]["enum"] == [
        "WAITING",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "TIMED_OUT",
        "CANCELLED",
        "SKIPPED",
    ]
    for field in ("nestedTaskflows", "nestedActiveRunningTaskFlowIds", "responseRef", "attempts"):
        assert field in task["properties"], field
    for field in ("taskflowId", "eventSubscription", "observedGeneration", "conditions"):
        assert field in status["properties"], field


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (1500, 1500),
        (604_800_000, 604_800_000),
        ("0s", 0),
        ("250ms", 250),
        ("90s", 90_000),
        ("1m30s", 90_000),
        ("2h", 7_200_000),
        ("1h1m1s1ms", 3_661_001),
        ("1h1h", 7_200_000),
        ("168h", 604_800_000),
        ("007s", 7_000),
    ],
)
def test_parse_duration_ms(value: int | str, ms: int) -> None:
    assert parse_duration_ms(value) == ms


@pytest.mark.parametrize(
    "value",
    ["10", "1.5s", "abc", "5 s", "", "-5s", "5d", "1m30", " 1s", "1s ", "s", -1, True, False],
)
def test_parse_duration_ms_refuses(value: int | str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_duration_ms(value)
    assert repr(value) in str(raised.value) or str(value) in str(raised.value)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (250, "250ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1s500ms"),
        (90_000, "1m30s"),
        (3_600_000, "1h"),
        (3_661_001, "1h1m1s1ms"),
        (604_800_000, "168h"),
    ],
)
def test_format_ms(ms: int, text: str) -> None:
    assert format_ms(ms) == text
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("ms", [1, 59_999, 60_000, 86_399_999, 604_800_000])
def test_format_then_parse_round_trips(ms: int) -> None:
    assert parse_duration_ms(format_ms(ms)) == ms

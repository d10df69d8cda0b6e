"""The API server rejects bad Taskflows at ``kubectl apply``, naming the field.

Every manifest in ``tests/invalid/`` is applied with the real ``kubectl`` against the real
kube-apiserver (with the generated CRD); its first line says which substring of the server's
error message must appear."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, Kubectl
from unit.test_validation import INVALID, expected

IMMUTABLE = "stages are immutable once the flow exists"


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected(path: Path, kubectl: Kubectl, namespace: str) -> None:
    result = kubectl("apply", "-f", str(path), "-n", namespace, check=False)
    assert result.returncode != 0, f"{path.name} was accepted: {result.stdout}"
    assert expected(path) in result.stderr, (
        f"{path.name}: expected {expected(path)!r} in:\n{result.stderr}"
    )
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    got = kubectl("get", "taskflow", name, "-n", namespace, "--ignore-not-found", "-o", "name")
    assert got.stdout.strip() == "", f"{path.name} left an object behind"


# -- valid manifests --------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["configure-group.yaml", "hello-world.yaml"])
def test_examples_apply_cleanly(example: str, kubectl: Kubectl, namespace: str) -> None:
    result = kubectl(
        "apply", "--dry-run=server", "-f", str(ROOT / "examples" / example), "-n", namespace
    )
    assert "created (server dry run)" in result.stdout
    assert result.stderr == ""


def flow(name: str, options: dict[str, object] | None = None, **task_options: object) -> str:
    task: dict[str, object] = {
        "name": "t1",
        "type": "ACTION",
        "params": {"n": 1, "nested": {"list": [1, "two", None]}},
        "taskDetails": {"serviceId": "group-core", "actionName": "create_group-2"},
    }
    if task_options:
        task["options"] = task_options
    spec: dict[str, object] = {
        "context": {"anything": ["goes", 1]},
        "stages": [
            {"name": "s1", "tasks": [task]},
            {
                "name": "s2",
                "tasks": [
                    {"name": "t1", "taskDetails": {"serviceId": "a", "actionName": "b"}},
                    {"name": "t2", "taskDetails": {"serviceId": "a", "actionName": "b"}},
                ],
            },
        ],
    }
    if options is not None:
        spec["options"] = options
    body = {
        "apiVersion": "taskflow.dev/v1alpha1",
        "kind": "Taskflow",
        "metadata": {"name": name},
        "spec": spec,
    }
    return yaml.safe_dump(body)


@pytest.mark.parametrize(
    ("options", "task_options"),
    [
        ({"timeout": 1500, "retryDelay": 0, "maxAge": 604_800_000, "maxRetries": 0}, {}),
        ({"timeout": "1m30s", "retryDelay": "250ms", "maxAge": "168h", "maxRetries": 100}, {}),
        ({"timeout": "90s"}, {"timeout": "2h", "retryDelay": 500, "maxAge": "1h1m1s1ms"}),
        (
            {"continueOnTaskFailure": True, "exactlyOnceTaskExecution": True},
            {"continueOnTaskFailure": False, "maxRetries": 3},
        ),
    ],
    ids=["int-ms", "strings", "task-override", "booleans"],
)
def test_valid_flow_accepts_ms_and_duration_strings(
    options: dict[str, object], task_options: dict[str, object], kubectl: Kubectl, namespace: str
) -> None:
    result = kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        "-",
        input=flow("durations", options, **task_options),
    )
    applied = json.loads(result.stdout)
    # Durations are kept as written (int-or-string), not converted by the server.
    assert applied["spec"]["options"] == options
    # The defaulted task type is filled in by the server.
    assert applied["spec"]["stages"][1]["tasks"][0]["type"] == "ACTION"


def test_task_type_taskflow_with_inline_spec_is_accepted(kubectl: Kubectl, namespace: str) -> None:
    body = yaml.safe_load(flow("nested"))
    body["spec"]["stages"][0]["tasks"] = [
        {"name": "child", "type": "TASKFLOW", "taskflow": yaml.safe_load(flow("x"))["spec"]}
    ]
    kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


# -- updates ----------------------------------------------------------------------------------


@pytest.fixture
def existing(kubectl: Kubectl, namespace: str) -> str:
    name = f"flow-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-n", namespace, "-f", "-", input=flow(name, {"timeout": "30s"}))
    return name


def test_update_of_stages_is_refused(existing: str, kubectl: Kubectl, namespace: str) -> None:
    body = yaml.safe_load(flow(existing, {"timeout": "30s"}))
    body["spec"]["stages"][1]["tasks"].append(
        {"name": "t3", "taskDetails": {"serviceId": "a", "actionName": "b"}}
    )
    result = kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0
    assert "spec.stages: Invalid value" in result.stderr, result.stderr
    assert IMMUTABLE in result.stderr


def test_json_patch_of_a_task_param_is_refused(
    existing: str, kubectl: Kubectl, namespace: str
) -> None:
    patch = [{"op": "replace", "path": "/spec/stages/0/tasks/0/params/n", "value": 2}]
    result = kubectl(
        "patch",
        "taskflow",
        existing,
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps(patch),
        check=False,
    )
    assert result.returncode != 0
    assert IMMUTABLE in result.stderr


def test_update_of_options_is_refused(existing: str, kubectl: Kubectl, namespace: str) -> None:
    result = kubectl(
        "patch",
        "taskflow",
        existing,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"options": {"timeout": "31s"}}}',
        check=False,
    )
    assert result.returncode != 0
    assert "spec.options: Invalid value" in result.stderr
    assert "options are immutable once the flow exists" in result.stderr


def test_cancel_and_retry_patches_are_accepted(
    existing: str, kubectl: Kubectl, namespace: str
) -> None:
    kubectl(
        "patch",
        "taskflow",
        existing,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"cancel": true}}',
    )
    retry = {"id": "r1", "stages": [{"name": "s2", "tasks": ["t2"]}], "failedOnly": False}
    kubectl(
        "patch",
        "taskflow",
        existing,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"cancel": False, "retry": retry}}),
    )
    kubectl(
        "patch",
        "tf",
        existing,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"retry": {"id": "r2", "stages": null, "failedOnly": true}}}',
    )
    got = json.loads(kubectl("get", "tf", existing, "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["cancel"] is False
    assert got["spec"]["retry"] == {"id": "r2", "failedOnly": True}
    # Re-applying the original manifest (stages unchanged) is accepted too.
    kubectl("apply", "-n", namespace, "-f", "-", input=flow(existing, {"timeout": "30s"}))


def test_retry_patch_naming_an_unknown_stage_is_refused(
    existing: str, kubectl: Kubectl, namespace: str
) -> None:
    result = kubectl(
        "patch",
        "taskflow",
        existing,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"retry": {"id": "r1", "stages": [{"name": "nope"}]}}}',
        check=False,
    )
    assert result.returncode != 0
    assert "retry.stages names a stage that is not in spec.stages" in result.stderr

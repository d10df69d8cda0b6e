"""TaskflowTemplate's pure half: arguments are checked against the template's parameters."""

from __future__ import annotations

from typing import Any

from taskflow.api.templates import TaskflowTemplateSpec, instantiate

TEMPLATE: dict[str, Any] = {
    "parameters": [
        {"name": "groupId", "required": True},
        {"name": "devices", "type": "array", "default": ["d1"]},
        {"name": "retries", "type": "integer", "default": 1},
    ],
    "options": {"timeout": "30s"},
    "stages": [
        {
            "name": "s",
            "tasks": [
                {
                    "name": "add",
                    "forEach": {"items": "${{ inputs.devices }}"},
                    "taskDetails": {"serviceId": "SVC", "actionName": "add"},
                    "params": {"group": "${{ inputs.groupId }}", "device": "${{ item }}"},
                }
            ],
        }
    ],
}


def test_arguments_are_checked_and_defaults_fill_the_rest() -> None:
    template = TaskflowTemplateSpec.model_validate(TEMPLATE)
    spec, problems = instantiate(template, {"groupId": "g1"})
    assert problems == []
    assert spec["inputs"] == {"groupId": "g1", "devices": ["d1"], "retries": 1}
    assert spec["stages"][0]["name"] == "s" and spec["options"] == {"timeout": "30s"}
    _, problems = instantiate(template, {"devices": "d2", "retries": True, "colour": "red"})
    assert problems == [
        "argument 'colour': the template has no such parameter",
        "argument 'groupId' is required",
        "argument 'devices': a array, not str",
        "argument 'retries': a integer, not bool",
    ]

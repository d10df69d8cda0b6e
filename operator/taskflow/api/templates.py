"""TaskflowTemplate: a flow defined once, with declared parameters, run by many Taskflows.

A Taskflow with ``templateRef: {name, arguments}`` is made from the template of that name in
its namespace when it starts: the arguments are checked against the parameters (unknown ones,
missing required ones, wrong types are refused with one message naming each), defaults fill
the rest, and the result becomes the flow's ``inputs``. The template's stages, options and
context become the flow's own (the operator writes them into its spec, with the template's
resourceVersion), so ``kubectl get -o yaml`` shows exactly what ran and a later change of the
template never changes a flow that already started. Stages reach the arguments through
expressions: ``"${{ inputs.groupId }}"``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from taskflow.api.spec import MAX_STAGES, FreeForm, Name, Options, Stage
from taskflow.api.spec import StrictModel as _Model

KIND = "TaskflowTemplate"
PLURAL = "taskflowtemplates"
ParamType = Literal["string", "number", "integer", "boolean", "object", "array"]
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class Parameter(_Model):
    name: Name
    type: ParamType = "string"
    default: Any = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    required: bool = False
    description: str | None = Field(default=None, max_length=1024)


class TaskflowTemplateSpec(_Model):
    parameters: list[Parameter] = Field(
        default_factory=list,
        max_length=100,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    options: Options | None = None
    context: FreeForm | None = None
    stages: list[Stage] = Field(
        min_length=1,
        max_length=MAX_STAGES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class TaskflowTemplateStatus(_Model):
    """Nothing yet: a template is data."""


def _is(value: Any, kind: str) -> bool:
    if kind in ("number", "integer") and isinstance(value, bool):
        return False  # (a bool is an int in Python, not in JSON)
    return isinstance(value, _JSON_TYPES[kind])


def instantiate(
    template: TaskflowTemplateSpec, arguments: dict[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """The spec fields a flow gets from ``template`` with ``arguments`` (stages, options,
    context, inputs), and every problem with the arguments (empty: none)."""
    given = dict(arguments or {})
    problems: list[str] = []
    declared = {p.name: p for p in template.parameters}
    for name in sorted(set(given) - set(declared)):
        problems.append(f"argument {name!r}: the template has no such parameter")
    inputs: dict[str, Any] = {}
    for parameter in template.parameters:
        if parameter.name in given:
            value = given[parameter.name]
            if not _is(value, parameter.type):
                problems.append(
                    f"argument {parameter.name!r}: a {parameter.type}, not {type(value).__name__}"
                )
            inputs[parameter.name] = value
        elif parameter.required:
            problems.append(f"argument {parameter.name!r} is required")
        elif parameter.default is not None:
            inputs[parameter.name] = parameter.default
    spec = template.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec.pop("parameters", None)
    spec["inputs"] = inputs
    return spec, problems

"""Expressions: CEL in a task's params and in ``when`` conditions, so values flow between stages.

In ``params``, a string that is exactly ``"${{ expr }}"`` becomes the typed result; an
``${{ expr }}`` inside a longer string is interpolated (strings as they are, other values as
JSON). ``when`` on a stage or a task is a CEL boolean (with or without the ``${{ }}``). The
variables are ``inputs`` (``spec.inputs``), ``context`` (``spec.context``) and ``stages``: for
every earlier stage, ``stages.<stage>.tasks.<task>`` with ``response``, ``status``, ``attempt``
and ``error``. Names with ``-`` are reached by index (``stages['set-up'].tasks['make-group']``).

CEL comes from ``common-expression-language`` (Rust's cel, with Python bindings): compiling and
evaluating a typical expression takes ~50 us, against ~900 us with the pure-Python cel-python.
Evaluation is pure and deterministic, so the engine stays pure; compiled programs are cached.
A flow's expressions are checked when it starts (syntax, and references to stages that do not
exist or do not come earlier), before anything is dispatched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from taskflow.api.spec import TaskflowSpec, base_name
from taskflow.api.status import Status, TaskflowStatus

MAX_EXPRESSION = 1024
# Serialised bytes of a task's resolved params, at most (status keeps them with the attempt).
MAX_RESOLVED_BYTES = 64 * 1024
_MARK = re.compile(r"\$\{\{(.*?)\}\}", re.S)
_WHOLE = re.compile(r"^\s*\$\{\{(.*)\}\}\s*$", re.S)
# stages.<name> or stages['<name>'] / stages["<name>"]
# CEL's comprehensions; one per expression keeps an expression's cost linear in its data (the
# bindings have no cost limit, and the engine must never stall on one flow).
_MACRO = re.compile(r"\.\s*(?:map|filter|all|exists_one|exists)\s*\(")
_STAGE_REF = re.compile(r"""\bstages\s*(?:\.\s*([A-Za-z0-9_]+)|\[\s*['"]([^'"]+)['"]\s*\])""")


class ExpressionError(ValueError):
    """An expression that cannot be compiled or evaluated; the message names it."""


def has_expressions(value: Any) -> bool:
    return any(True for _ in _strings(value, ""))


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, string) of every string in ``value`` holding an expression (no recursion limit
    issues: params are bounded by the CRD and by the API server's object size)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "${{" in item:
                yield where, item
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _unwrap(condition: str) -> str:
    whole = _WHOLE.match(condition)
    return whole.group(1).strip() if whole else condition.strip()


@lru_cache(maxsize=4096)
def _compile(expression: str) -> Any:
    if len(expression) > MAX_EXPRESSION:
        raise ExpressionError(f"longer than {MAX_EXPRESSION} characters")
    if not expression:
        raise ExpressionError("empty expression")
    if len(_MACRO.findall(expression)) > 1:
        raise ExpressionError("at most one map/filter/all/exists/exists_one per expression")
    import cel  # here: its ~12 MB of resident memory only in an operator whose flows use CEL

    try:
        return cel.compile(expression)
    except ValueError as exc:
        raise ExpressionError(_short(str(exc))) from None


def _short(text: str) -> str:
    return " ".join(text.split())[:300]


def evaluate(expression: str, variables: dict[str, Any]) -> Any:
    program = _compile(expression)
    try:
        result = program.execute(variables)
    except Exception as exc:  # (the bindings raise KeyError, TypeError, ValueError, ...)
        what = f"no such key: {exc}" if isinstance(exc, KeyError) else _short(str(exc))
        raise ExpressionError(f"${{{{ {expression} }}}}: {what}") from None
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        raise ExpressionError(
            f"${{{{ {expression} }}}}: its result ({type(result).__name__}) is not JSON"
        ) from None
    return result


def resolve(value: Any, variables: dict[str, Any]) -> Any:
    """``value`` with every expression in it replaced (raises ExpressionError)."""
    if isinstance(value, str):
        if "${{" not in value:
            return value
        whole = _WHOLE.match(value)
        if whole and "${{" not in whole.group(1):
            return evaluate(whole.group(1).strip(), variables)

        def text(match: re.Match[str]) -> str:
            result = evaluate(match.group(1).strip(), variables)
            return result if isinstance(result, str) else json.dumps(result)

        return _MARK.sub(text, value)
    if isinstance(value, dict):
        return {k: resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, variables) for v in value]
    return value


def resolve_params(params: Any, variables: dict[str, Any]) -> Any:
    resolved = resolve(params, variables)
    size = len(json.dumps(resolved, separators=(",", ":")))
    if size > MAX_RESOLVED_BYTES:
        raise ExpressionError(
            f"the resolved params are {size} bytes, over the limit of {MAX_RESOLVED_BYTES}"
        )
    return resolved


def holds(condition: str, variables: dict[str, Any]) -> bool:
    """A ``when``: its value, which must be a boolean."""
    expression = _unwrap(condition)
    result = evaluate(expression, variables)
    if not isinstance(result, bool):
        raise ExpressionError(
            f"when: ${{{{ {expression} }}}} is {type(result).__name__}, not a boolean"
        )
    return result


def variables(
    spec: TaskflowSpec,
    status: TaskflowStatus,
    stage_index: int,
    fetched: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an expression of stage ``stage_index`` sees: inputs, context, earlier stages.
    ``fetched``: responses kept in the object store, by ``responseRef`` (the shell reads
    them before it decides)."""
    stored = fetched or {}

    def response(t: Any) -> Any:
        return stored.get(t.response_ref) if t.response_ref else t.response

    stages: dict[str, Any] = {}
    for stage in status.stages[:stage_index]:
        tasks: dict[str, Any] = {}
        fanned: dict[str, list[Any]] = {}
        for t in stage.tasks:
            if t.index is not None:
                fanned.setdefault(base_name(t.name), []).append(t)
                continue
            tasks[t.name] = {
                "response": response(t),
                "status": str(t.status),
                "attempt": t.attempt,
                "error": t.error.model_dump(exclude_none=True) if t.error else None,
            }
        for name, entries in fanned.items():  # a fan-out: its entries' values, as lists
            ok = all(e.status in (Status.SUCCEEDED, Status.SKIPPED) for e in entries)
            tasks[name] = {
                "response": [response(e) for e in entries],
                "items": [e.item for e in entries],
                "status": "SUCCEEDED" if ok else "FAILED",
                "statuses": [str(e.status) for e in entries],
                "attempt": max(e.attempt for e in entries),
                "error": next(
                    (e.error.model_dump(exclude_none=True) for e in entries if e.error is not None),
                    None,
                ),
            }
        stages[stage.name] = {"status": str(stage.status), "tasks": tasks}
    return {"inputs": spec.inputs or {}, "context": spec.context or {}, "stages": stages}


def problems(spec: TaskflowSpec) -> list[str]:
    """Every expression of the flow that cannot work, as "<field>: <why>": syntax errors, and
    references to stages that do not exist or do not come earlier."""
    found: list[str] = []
    names = [s.name for s in spec.stages]
    for index, stage in enumerate(spec.stages):
        where = f"spec.stages[{index}]"
        places: list[tuple[str, str]] = []
        if stage.when:
            places.append((f"{where}.when", _unwrap(stage.when)))
        for t_index, task in enumerate(stage.tasks):
            t_where = f"{where}.tasks[{t_index}]"
            if task.when:
                places.append((f"{t_where}.when", _unwrap(task.when)))
            items = task.for_each.items if task.for_each else None
            if isinstance(items, str):
                whole = _WHOLE.match(items)
                if whole is None:
                    found.append(f'{t_where}.forEach.items: a list, or one "${{{{ expr }}}}"')
                else:
                    places.append((f"{t_where}.forEach.items", whole.group(1).strip()))
            elif task.for_each is not None and not isinstance(items, list):
                found.append(f'{t_where}.forEach.items: a list, or one "${{{{ expr }}}}"')
            for path, text in _strings(task.params, f"{t_where}.params"):
                places += [(path, m.group(1).strip()) for m in _MARK.finditer(text)]
                if text.count("${{") != len(_MARK.findall(text)):
                    found.append(f"{path}: '${{{{' without its closing '}}}}'")
        for path, expression in places:
            try:
                _compile(expression)
            except ExpressionError as exc:
                found.append(f"{path}: {exc}")
                continue
            for match in _STAGE_REF.finditer(expression):
                ref = match.group(1) or match.group(2)
                if ref not in names:
                    found.append(f"{path}: no stage {ref!r} in this flow")
                elif names.index(ref) >= index:
                    found.append(f"{path}: stage {ref!r} does not come before stage {stage.name!r}")
    return found


def uses_expressions(spec: TaskflowSpec) -> bool:
    """Whether any stage or task of the flow has an expression (params, when, forEach)."""
    return any(
        stage.when is not None
        or any(
            t.when is not None or t.for_each is not None or has_expressions(t.params)
            for t in stage.tasks
        )
        for stage in spec.stages
    )

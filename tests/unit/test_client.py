"""The Python client's pure parts: the docs page's example is extracted as written."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Reply = Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]]


# -- produce, events, details --------------------------------------------------------------------


# -- cancel ------------------------------------------------------------------------------------


# -- retry -------------------------------------------------------------------------------------


# -- events ------------------------------------------------------------------------------------


# -- the sync wrapper, the link constants and the docs -------------------------------------------


def test_child_links_use_the_operators_keys() -> None:
    from taskflow import client
    from taskflow.shell import effects  # where the operator writes a child's links

    for key in (
        "PARENT_UID",
        "PARENT_NAME",
        "PARENT_TASK",
        "PARENT_ATTEMPT",
        "PARENT_CONTEXT",
        "DEPTH",
    ):
        assert getattr(client, key) == getattr(effects, key)

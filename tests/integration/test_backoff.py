"""Retries that back off on the real servers: a failing service is asked again, later each time."""

from __future__ import annotations

import pytest


@pytest.mark.integration
async def test_a_task_that_fails_fast_when_nobody_serves_it(operator, flows, svc: str) -> None:
    from conftest import flow, task_status

    await flows.create(flow(svc, ["t"], options={"timeout": "60s", "whenNoService": "fail"}), "f")
    done = await flows.wait("f", timeout=20)
    t = task_status(done, "s1", "t")
    assert t["status"] == "FAILED" and t["error"]["reason"] == "NoService"

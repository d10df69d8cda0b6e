"""Hundreds of replies at once, and an operator killed mid-flight: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
from collections import Counter
from typing import Any

from conftest import GROUP, PLURAL, VERSION, Flows, eventually, flow, serve, task_status
from taskflow.api.status import Status, TaskflowStatus
from taskflow.wire import journal


async def test_stage_of_200_parallel_tasks_loses_no_reply(
    operator, flows: Flows, nc, svc: str
) -> None:
    names = [f"t{i:03d}" for i in range(200)]
    pending: list[Any] = []
    release = asyncio.Event()

    async def hold(msg: Any) -> Any:
        if json.loads(msg.data)["task"] == "first":
            return {"success": True, "data": "first"}
        pending.append(msg)
        if len(pending) == len(names):
            release.set()
        await release.wait()  # every reply goes out at the same moment
        return {"success": True, "data": json.loads(msg.data)["task"]}

    await serve(nc, f"{svc}.do", hold)
    before = operator.metrics().get("taskflow_status_writes_total", 0)
    await flows.create(flow(svc, ["first"], names), "wide")
    done = await flows.wait("wide", timeout=60)
    writes = operator.metrics()["taskflow_status_writes_total"] - before
    status = done["status"]
    assert status["phase"] == "SUCCEEDED"
    assert status["progress"] == "201/201"
    responses = {t["name"]: t["response"] for t in status["stages"][1]["tasks"]}
    assert responses == {n: n for n in names}
    print(f"\nstatus writes for a flow of 1 + 200 parallel tasks: {writes:.0f}")
    # Writes grow with stages, not tasks: start, stage 1 done + stage 2 dispatched, the end,
    # plus at most a few lazy progress flushes while the 200 replies land.
    assert writes <= 8, writes


async def test_operator_killed_with_50_tasks_in_flight(
    operator, flows: Flows, nc, svc: str
) -> None:
    """SIGKILL while 50 attempts are in flight; replies sent while it is down are found in the
    reply stream after the restart; with exactlyOnceTaskExecution nothing is sent twice."""
    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))  # answer later, by hand
    rec_keys: Counter[str] = Counter()
    names = [f"t{i:02d}" for i in range(10)]
    for i in range(5):
        await flows.create(
            flow(
                svc, names, ["after"], options={"exactlyOnceTaskExecution": True, "timeout": "60s"}
            ),
            f"f{i}",
        )
    for _ in range(100):
        if len(held) >= 50:
            break
        await asyncio.sleep(0.1)
    assert len(held) == 50
    operator.kill(signal.SIGKILL)
    for msg in held:  # every reply arrives while the operator is down
        rec_keys[msg.headers["Taskflow-Idempotency-Key"]] += 1
        await nc.publish(msg.reply, json.dumps({"success": True, "data": "ok"}).encode())
    await nc.flush()
    held.clear()
    operator.start()
    for _ in range(100):  # the second stage dispatches after the restart
        if len(held) >= 5:
            break
        await asyncio.sleep(0.1)
    for msg in held:
        rec_keys[msg.headers["Taskflow-Idempotency-Key"]] += 1
        await nc.publish(msg.reply, json.dumps({"success": True, "data": "ok"}).encode())
    for i in range(5):
        done = await flows.wait(f"f{i}", timeout=30)
        assert done["status"]["phase"] == "SUCCEEDED", done["status"]
        assert done["status"]["progress"] == "11/11"
    assert len(rec_keys) == 55
    assert max(rec_keys.values()) == 1, "an attempt was dispatched twice"


def _before_second_stage(status: dict[str, Any]) -> dict[str, Any]:
    """The status as the API held it before ``s2`` started: ``first`` still running."""
    older = copy.deepcopy(status)
    s1, s2 = older["stages"]
    first, second = s1["tasks"][0], s2["tasks"][0]
    for key in ("response", "endTime"):
        first.pop(key, None)
    first.update(status="RUNNING", deadline="2099-01-01T00:00:00.000Z")
    s1["status"] = "RUNNING"
    s1.pop("endTime", None)
    s2["status"] = second["status"] = "WAITING"
    s2.pop("startTime", None)
    for key in ("startTime", "dispatchTime", "deadline"):
        second.pop(key, None)
    older["writeSeq"] -= 1
    return older


async def test_operator_killed_between_dispatch_and_api_write(
    operator, flows: Flows, nc, svc: str
) -> None:
    """A dispatch is kept in the NATS journal before it is sent and written to the API after.
    The operator dies in between: the API still shows the previous stage running (its reply
    waiting in the reply stream). After the restart the journal's newer copy wins, so the
    attempt already sent is not sent again (exactlyOnceTaskExecution)."""
    second: list[Any] = []

    def answer(msg: Any) -> Any:
        if json.loads(msg.data)["task"] == "first":
            return {"success": True, "data": "one"}
        second.append(msg)  # answered by hand, after the restart
        return None

    await serve(nc, f"{svc}.do", answer)
    await flows.create(
        flow(
            svc, ["first"], ["second"], options={"exactlyOnceTaskExecution": True, "timeout": "60s"}
        ),
        "wal",
    )
    body = await flows.wait(
        "wal",
        until=lambda b: (
            "status" in b
            and len(b["status"].get("stages", [])) == 2
            and task_status(b, "s2", "second")["status"] == "RUNNING"
        ),
    )
    for _ in range(100):  # sent before that write; on its way to this process's subscriber
        if second:
            break
        await asyncio.sleep(0.05)
    assert len(second) == 1
    operator.kill(signal.SIGKILL)

    uid = body["metadata"]["uid"]
    kept = (await _journal_entry(nc, uid)).status.model_dump(by_alias=True, exclude_none=True)
    assert kept["writeSeq"] == body["status"]["writeSeq"]
    assert task_status({"status": kept}, "s2", "second")["status"] == "RUNNING"

    body["status"] = older = _before_second_stage(body["status"])
    await asyncio.to_thread(
        flows.custom.replace_namespaced_custom_object_status,
        GROUP,
        VERSION,
        flows.namespace,
        PLURAL,
        "wal",
        body,
    )

    operator.start()
    resumed = await flows.wait("wal", until=lambda b: b["status"]["writeSeq"] > older["writeSeq"])
    assert task_status(resumed, "s1", "first")["response"] == "one"
    assert task_status(resumed, "s2", "second")["status"] == "RUNNING"
    await asyncio.sleep(0.5)  # a second dispatch, had there been one, was sent before that write
    assert len(second) == 1, "the attempt kept in the journal was sent again"

    await nc.publish(second[0].reply, json.dumps({"success": True, "data": "two"}).encode())
    done = await flows.wait("wal")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert task_status(done, "s2", "second")["response"] == "two"
    assert len(second) == 1


async def test_journal_entry_is_dropped_only_if_still_the_writers_own(stack, svc: str) -> None:
    """A finished flow's journal entry goes, unless a newer writer (a retry) kept a newer one."""
    from taskflow.shell.bus import Bus, NatsSettings
    from taskflow.wire.subjects import Subjects

    bus = await Bus.connect(NatsSettings(url=stack.nats.url), Subjects())
    try:
        uid = f"uid-{svc}"
        first = await bus.journal(uid, b'{"writeSeq":1}')
        await bus.journal(uid, b'{"writeSeq":2}')
        await bus.forget_journal(uid, first)  # a finished writer, late: a retry wrote since
        kept = await bus.journaled(uid)
        assert kept is not None and kept[0] == b'{"writeSeq":2}'
        latest = await bus.journal(uid, b'{"writeSeq":3}')
        await bus.forget_journal(uid, latest)
        assert await bus.journaled(uid) is None
    finally:
        await bus.close()


async def test_finished_flow_leaves_no_journal_entry(operator, flows: Flows, nc, svc: str) -> None:
    await serve(nc, f"{svc}.do")
    created = await flows.create(flow(svc, ["a"], ["b"]), "journaled")
    done = await flows.wait("journaled")
    assert done["status"]["phase"] == "SUCCEEDED"
    journal = await nc.jetstream().key_value("taskflow-journal")
    for _ in range(50):
        try:
            await journal.get(created["metadata"]["uid"])
        except Exception:  # KeyDeletedError: dropped
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the finished flow's journal entry is still there")


async def test_a_crd_older_than_the_operator_turns_the_journal_off(
    tmp_path_factory, tmp_path
) -> None:
    """Helm does not upgrade CRDs: with one from before status.writeSeq the API drops that
    field, and a restarted writer could no longer tell the journal's copy from an older one.
    The operator says so and goes back to writing the API before dispatching; flows still run."""
    import nats
    from kubernetes import client, config

    from conftest import OperatorProcess
    from taskflow.api.crd import crd
    from taskflow.devstack import DevStack

    with DevStack(tmp_path_factory.mktemp("old-crd")) as stack:
        old = crd()
        for version in old["spec"]["versions"]:
            status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
            del status["properties"]["writeSeq"]
        api = config.new_client_from_config(str(stack.kubeconfig))
        await asyncio.to_thread(
            client.ApiextensionsV1Api(api).patch_custom_resource_definition,
            name=old["metadata"]["name"],
            body=old,
            field_manager="old-release",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        await asyncio.to_thread(
            client.CoreV1Api(api).create_namespace, client.V1Namespace(metadata={"name": "flows"})
        )
        nc = await nats.connect(stack.nats.url)
        operator = OperatorProcess(stack, tmp_path)
        try:
            await serve(nc, "svc.do")
            operator.start()
            flows = Flows(api, "flows")
            journaled = []
            for name in ("first", "second"):
                await flows.create(flow("svc", ["a"], ["b", "c"]), name)
                done = await flows.wait(name)
                assert done["status"]["phase"] == "SUCCEEDED", done["status"]
                assert "writeSeq" not in done["status"]
                journaled.append(operator.metrics().get("taskflow_journal_writes_total", 0))
            assert "older than this operator" in operator.log_path.read_text()
            # The first flow's first API write showed it (its stage 2 and the results may have
            # been journaled before that write returned); the second flow was not journaled.
            assert 1 <= journaled[0] <= 4
            assert journaled[1] == journaled[0]
        finally:
            operator.stop()
            await nc.close()
            api.close()


async def _operator_key(nc: Any) -> bytes:
    entry = await (await nc.jetstream().key_value("taskflow-keys")).get("operator")
    return bytes(entry.value)


async def _journal_entry(nc: Any, uid: str) -> journal.Entry:
    raw = (await (await nc.jetstream().key_value("taskflow-journal")).get(uid)).value
    return journal.decode_entry(raw, key=await _operator_key(nc))


async def _put_journal_entry(
    nc: Any, uid: str, status: TaskflowStatus, events: list[dict[str, Any]], *, signed: bool = True
) -> None:
    raw = journal.encode(
        status,
        [(e["seq"], json.dumps(e).encode()) for e in events],
        key=await _operator_key(nc) if signed else None,
    )
    await (await nc.jetstream().key_value("taskflow-journal")).put(uid, raw)


async def _events(nc: Any, uid: str) -> list[tuple[int, dict[str, Any]]]:
    """(stream sequence, event) of every event the stream keeps for a flow, in stream order."""
    sub = await nc.jetstream().subscribe(f"taskflow.events.{uid}", ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:  # (nats' TimeoutError: nothing more)
                return out
            out.append((msg.metadata.sequence.stream, json.loads(msg.data)))
    finally:
        await sub.unsubscribe()


async def test_events_journaled_but_not_published_reach_the_stream_after_a_kill(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The operator dies after journaling a decision and before its events leave (made here
    by adding three events to its last journal entry, as a decision it had not sent yet):
    the restarted writer publishes them from the journal, and numbers on after them, so the
    flow's stream holds seq 1..n, each once."""
    held: list[Any] = []

    def answer(msg: Any) -> Any:
        if json.loads(msg.data)["task"] == "first":
            return {"success": True, "data": "one"}
        held.append(msg)
        return None

    await serve(nc, f"{svc}.do", answer)
    await flows.create(flow(svc, ["first"], ["second", "third"], options={"timeout": "60s"}), "ev")
    body = await flows.wait(
        "ev",
        until=lambda b: (
            len((b.get("status") or {}).get("stages", [])) == 2
            and task_status(b, "s2", "third")["status"] == "RUNNING"
        ),
    )
    await eventually(lambda: len(held) == 2)
    await asyncio.sleep(0.3)  # the events of that round are in the stream by now
    operator.kill(signal.SIGKILL)

    uid = body["metadata"]["uid"]
    kept = await _journal_entry(nc, uid)
    assert kept.events, "the journal keeps the events of its last decision"
    status = kept.status
    top = status.last_event_seq
    assert [e["seq"] for _, e in await _events(nc, uid)] == list(range(1, top + 1))
    unsent = [{**json.loads(kept.events[-1][1]), "seq": top + i} for i in (1, 2, 3)]
    status.last_event_seq = top + 3
    status.write_seq += 1
    await _put_journal_entry(nc, uid, status, unsent)

    operator.start()
    for msg in held:
        await nc.publish(msg.reply, json.dumps({"success": True, "data": "two"}).encode())
    done = await flows.wait("ev")
    assert done["status"]["phase"] == "SUCCEEDED"
    await asyncio.sleep(0.5)
    after = [e for _, e in await _events(nc, uid)]
    seqs = [e["seq"] for e in after]
    assert seqs == list(range(1, len(after) + 1)), seqs
    assert seqs[-1] == done["status"]["lastEventSeq"] > top + 3
    assert after[top : top + 3] == unsent


async def test_a_forged_journal_entry_is_refused(operator, flows: Flows, nc, svc: str) -> None:
    """Any client with JetStream access can write the journal bucket: an entry not signed
    with the operator's key (here one claiming the task succeeded) is ignored on resume."""
    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))
    body = await flows.create(flow(svc, ["a"], options={"timeout": "60s"}), "forge")
    await flows.wait(
        "forge", until=lambda b: "status" in b and task_status(b, "s1", "a")["status"] == "RUNNING"
    )
    await eventually(lambda: held)
    operator.kill(signal.SIGKILL)
    uid = body["metadata"]["uid"]
    forged = (await _journal_entry(nc, uid)).status
    forged.write_seq += 5
    task = forged.stages[0].tasks[0]
    task.status, task.response = Status.SUCCEEDED, {"forged": True}
    await _put_journal_entry(nc, uid, forged, [], signed=False)
    operator.start()
    # (waited for: on a loaded machine the operator may take a while to resume the flow)
    await eventually(
        lambda: "journal entry refused: not signed" in operator.log_path.read_text(), timeout=15
    )
    assert task_status(await flows.get("forge"), "s1", "a")["status"] == "RUNNING"
    await nc.publish(held[0].reply, json.dumps({"success": True, "data": "real"}).encode())
    done = await flows.wait("forge")
    assert task_status(done, "s1", "a")["response"] == "real"


async def test_a_finished_flow_with_a_journal_entry_publishes_its_last_events(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The operator dies after writing the end of a flow to the API and before its last events
    reach the stream (made here by a journal entry that holds two events the stream lacks):
    the restarted operator runs a writer for every flow left in the journal, finished or not,
    which publishes them and drops the entry."""
    await serve(nc, f"{svc}.do")
    await flows.create(flow(svc, ["a"]), "done")
    body = await flows.wait("done")
    uid = body["metadata"]["uid"]
    operator.kill(signal.SIGKILL)
    stream = [e for _, e in await _events(nc, uid)]
    top = body["status"]["lastEventSeq"]
    assert [e["seq"] for e in stream] == list(range(1, top + 1))
    status = TaskflowStatus.model_validate(body["status"])
    unsent = [{**stream[-1], "seq": top + i} for i in (1, 2)]
    status.last_event_seq = top + 2
    await _put_journal_entry(nc, uid, status, unsent)
    operator.start()
    for _ in range(100):
        after = [e for _, e in await _events(nc, uid)]
        if len(after) == top + 2:
            break
        await asyncio.sleep(0.1)
    assert [e["seq"] for e in after] == list(range(1, top + 3))
    assert after[top:] == unsent
    kv = await nc.jetstream().key_value("taskflow-journal")
    for _ in range(50):
        try:
            await kv.get(uid)
        except Exception:
            break  # dropped: the flow's writer finished
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the journal entry was not dropped")

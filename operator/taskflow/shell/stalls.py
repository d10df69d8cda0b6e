"""A writer that cannot record its flow: it says so and keeps trying, never gives up.

An input that cannot be decided or recorded fails its attempt (``BadReply``) and the round is
made again without it. Any other failure sets a ``Stalled`` condition and posts one Warning
Event per distinct error (the reason code only), and the round is made again after a pause that
grows to 30 s, inputs kept: the flow's timeouts, ``maxAge`` and cancel still act once the cause
is gone. A mixin of ``runner.FlowRunner``, whose state it reads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Literal

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import TaskflowStatus
from taskflow.engine import Decision, Input, quarantine
from taskflow.kube import Gone
from taskflow.shell import metrics
from taskflow.shell.effects import describe
from taskflow.shell.objects import iso_now, now_ms
from taskflow.wire.replies import clip

if TYPE_CHECKING:
    from taskflow.kube import Kube
    from taskflow.shell.registry import Registry
    from taskflow.shell.settings import RunnerSettings


class Stalls:
    """Failed rounds and writes (``runner.FlowRunner`` holds the state)."""

    uid: str
    name: str
    namespace: str
    body: dict[str, Any]
    kube: Kube
    registry: Registry
    settings: RunnerSettings
    log: logging.LoggerAdapter[logging.Logger]
    inbox: list[Input]
    trouble: str | None
    failures: int
    save_after: float

    if TYPE_CHECKING:  # provided by runner.FlowRunner and its other parts

        @property
        def status(self) -> TaskflowStatus: ...
        def spec(self) -> TaskflowSpec: ...
        async def decide_and_write(self, inputs: list[Input]) -> Decision | None: ...

    async def decide_despite(
        self, inputs: list[Input], exc: Exception
    ) -> Decision | Literal[False] | None:
        """A round failed. An input that cannot be decided or recorded fails its attempt
        (``BadReply``) and the round is made again without it. Any other failure is reported
        (a ``Stalled`` condition and a Warning Event) and the round is made again after a
        pause, with its inputs kept: the writer never gives up on a flow, so its timeouts,
        ``maxAge`` and cancel still act once the cause is gone. False: nothing decided."""
        if inputs:
            try:
                cleaned = quarantine(
                    spec=self.spec(),
                    status=self.status,
                    inputs=inputs,
                    now=now_ms(),
                    uid=self.uid,
                    generation=int(self.body["metadata"].get("generation") or 0),
                    event_subject=self.settings.subjects.events(self.uid),
                )
            except Exception as inner:  # (the spec itself, say): reported below
                cleaned, exc = inputs, inner
            # By identity: comparing a deep input by value could itself raise.
            replaced = len(cleaned) != len(inputs) or any(
                a is not b for a, b in zip(inputs, cleaned, strict=False)
            )
            if replaced:
                metrics.BAD_REPLIES.labels(reason="unrecordable").inc(
                    len(inputs) - sum(1 for a, b in zip(inputs, cleaned, strict=False) if a is b)
                )
                self.log.warning("a reply could not be recorded; its attempt fails: %s", exc)
                try:
                    return await self.decide_and_write(cleaned)
                except (Gone, asyncio.CancelledError):
                    raise
                except Exception as again:
                    exc, inputs = again, cleaned
        self.inbox[:0] = inputs  # nothing is lost: the next round has them again
        metrics.REPLY_QUEUE.inc(len(inputs))
        await asyncio.sleep(self.note_trouble(exc))
        return False

    def note_trouble(self, exc: Exception) -> float:
        """A round or a write failed: say so (a ``Stalled`` condition and a Warning Event,
        once per distinct error) and return how long to pause before trying again."""
        self.failures += 1
        pause: float = min(0.5 * 2.0 ** (self.failures - 1), 30.0)
        message = clip(describe(exc), 300, "message")
        self.log.error(
            "flow writer failed (%d in a row), trying again in %.1f s: %s",
            self.failures,
            pause,
            message,
        )
        metrics.WRITER_FAILURES.inc()
        if message != self.trouble:  # once per distinct error, not per try
            self.trouble = message
            text = f"the operator cannot record this flow and keeps trying: {message}"
            # The Event names the kind of error only; its text (which may quote status) goes
            # to the condition, as namespace-private as the status itself.
            code = getattr(exc, "status", None)
            kind = f"{type(exc).__name__}{f' {code}' if code else ''}"
            self.registry.spawn(
                self.kube.event(
                    self.body,
                    reason="WriterFailing",
                    type_="Warning",
                    message=f"the operator cannot record this flow and keeps trying ({kind}); "
                    "see the Stalled condition",
                )
            )
            self.registry.spawn(self.mark_stalled(text))
        return pause

    def recovered(self) -> None:
        if self.failures:
            self.log.info("flow writer recovered")
        self.trouble, self.failures, self.save_after = None, 0, 0.0

    async def mark_stalled(self, message: str) -> None:
        """A ``Stalled`` condition on the stored status as it is (the writer's own status may
        be what cannot be written). The next full write drops it: the engine's conditions do
        not include it."""
        try:
            fresh = await self.kube.get(self.namespace, self.name)
            status = fresh.setdefault("status", {})
            conditions = [
                c
                for c in status.get("conditions") or []
                if isinstance(c, dict) and c.get("type") != "Stalled"
            ]
            conditions.append(
                {
                    "type": "Stalled",
                    "status": "True",
                    "reason": "WriterFailing",
                    "message": message,
                    "lastTransitionTime": iso_now(),
                }
            )
            status["conditions"] = conditions
            await self.kube.replace_status(fresh)
        except Exception as exc:  # (a conflict: the writer got through meanwhile)
            self.log.warning("could not set the Stalled condition: %s", exc)

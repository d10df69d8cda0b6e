"""The service SDK: serve Taskflow tasks from Python with a few lines.

::

    service = Service("appliance-core")

    @service.action("AddApplianceToGroup")
    async def add_appliance(params: dict, ctx: TaskContext) -> dict:
        if not reachable(params["applianceId"]):
            raise TaskFailure("appliance unreachable", code="UNREACHABLE")
        return {"applianceId": params["applianceId"]}

    asyncio.run(service.run())   # until SIGINT/SIGTERM

It is built on the NATS Services API (``nats.micro``): every instance answers ``$SRV.PING``,
``$SRV.INFO`` and ``$SRV.STATS``, and the instances of a service share a queue group, so adding
instances scales out. An action's endpoint subject is ``<serviceId>.<actionName>``, the
operator's default subject template. Nothing here is required to serve tasks: any NATS client
that answers the request with ``{"success": true, "data": ...}`` works (see docs/sdk.md).

What the SDK adds over a bare NATS handler:

- a typed ``TaskContext`` parsed from the ``taskflowExecutionContext`` and ``Taskflow-*``
  headers (flow, stage, task, attempt, idempotency key, options, previous stage responses, the
  parent's context for nested flows, deadline and expiry);
- handlers run concurrently, one asyncio task per request; a redelivery of an attempt that is
  still running is not run twice, and one that already finished gets the same reply again;
- a request whose ``Taskflow-Expires-At`` (the task's maxAge) has passed is dropped unanswered;
- a cancel notice on ``taskflow.cancel.<serviceId>`` cancels the handler serving that attempt;
- ``ctx.start_child(spec)`` starts a child Taskflow linked to the task being served; the reply
  then names it in ``nestedTaskflows`` and the task finishes only when its children do;
- with OpenTelemetry installed (``pip install 'taskflow-operator[tracing]'``) and a tracer
  provider set (the global one, or ``tracer_provider=``), each handler runs in a span whose
  parent is the attempt's span in the operator's trace (the ``traceparent`` header).
"""

from taskflow.sdk.context import Nested, TaskContext, TaskFailure
from taskflow.sdk.service import ActionHandler, Counters, Service

__all__ = ["ActionHandler", "Counters", "Nested", "Service", "TaskContext", "TaskFailure"]

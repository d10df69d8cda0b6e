"""The operator's validating admission webhook: what the CRD's schema cannot check, at apply.

The schema and its CEL rules cannot read the CEL *inside* a flow's params and conditions. This
webhook can: on CREATE it runs ``engine.expressions.problems`` (syntax, unclosed ``${{``,
references to a stage that does not exist or does not come earlier) and refuses the flow with
every problem named by its field. It answers nothing else, holds no state, and its
configuration says ``failurePolicy: Ignore``: if the operator is down, the flow is admitted and
the same check fails it when it starts (``InvalidExpression``), before anything is sent.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from taskflow.api.spec import TaskflowSpec
from taskflow.engine import expressions

log = logging.getLogger("taskflow.webhook")
PATH = "/validate-taskflow"
# An AdmissionReview body is bounded by the object's size limit; refuse far above it.
MAX_BODY = 8 * 1024 * 1024


def review(request: dict[str, Any]) -> dict[str, Any]:
    """The AdmissionReview response for a request (pure: tested without a server)."""
    uid = request.get("uid", "")
    allowed: dict[str, Any] = {"uid": uid, "allowed": True}
    if request.get("operation") != "CREATE":
        return allowed
    obj = request.get("object") or {}
    try:
        spec = TaskflowSpec.model_validate(obj.get("spec") or {})
    except ValidationError:
        return allowed  # the schema refuses what is malformed, with its own messages
    found = expressions.problems(spec)
    if not found:
        return allowed
    message = "; ".join(found)
    return {
        "uid": uid,
        "allowed": False,
        "status": {"code": 422, "reason": "Invalid", "message": f"expressions: {message}"[:4000]},
    }


async def _handle(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read())
        answer = review(body.get("request") or {})
    except Exception as exc:  # never block the API server on our mistake (and say so)
        log.warning("admission review not understood: %s", exc)
        answer = {"uid": "", "allowed": True}
    return web.json_response(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}
    )


async def serve_webhook(*, address: str, cert_file: str, key_file: str) -> web.AppRunner | None:
    """Serve the webhook over TLS on ``host:port``; None (logged) when it cannot listen."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, _handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host or "0.0.0.0", int(port), ssl_context=context).start()
    except OSError as exc:
        log.error(
            "admission webhook not served on %s: %s (expressions are still checked "
            "when each flow starts)",
            address,
            exc,
        )
        await runner.cleanup()
        return None
    log.info("admission webhook on https://%s%s", address, PATH)
    return runner

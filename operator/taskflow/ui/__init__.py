"""The web view: the flows, each flow's stage and task graph, its tasks and its live event log,
with retry and cancel for a signed-in user (docs/ui.md).

Served by ``taskflow-operator ui`` (or ``run --ui-address``) with aiohttp; pages are rendered
on the server (``pages``, escaped by ``html``) and made live by one small script
(``static/ui.js``) reading Server-Sent Events (``live``): a Kubernetes watch for the list and a
flow's status, the flow's JetStream events for its log. Signing in (``sessions``, ``access``)
checks a Kubernetes token as the NATS API does, TokenReview then SubjectAccessReview; without
it the view is read-only. It sits beside the shell: it uses the client, the wire and the
models (the signed-in user checked by ``client.access``, as the NATS API checks its callers).
"""

from taskflow.ui.server import UiServer, run_ui, serve_ui

__all__ = ["UiServer", "run_ui", "serve_ui"]

"""Who may retry and cancel from the page: the signed-in user, as Kubernetes says.

The same check as the NATS API's (``client.access.Authorizer``): a TokenReview of the user's
bearer token, then a SubjectAccessReview of ``patch`` on taskflows in the flow's namespace (the
verb ``kubectl patch`` needs for ``spec.cancel`` and ``spec.retry``). Only then are the forms
enabled; and the action itself is sent with the user's own token (``user_api_client``), so the
API server authorizes it once more and its audit log names the user, not the view.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from kubernetes import client as k8s

from taskflow.client import TaskflowError
from taskflow.client.access import Authorizer, Caller
from taskflow.ui.pages import Viewer
from taskflow.ui.sessions import Session

log = logging.getLogger("taskflow.ui")

VERB = "patch"


class Gate:
    """Sign-in and the read-only decision, over the view's own Kubernetes connection (which
    must be allowed to create TokenReviews and SubjectAccessReviews: system:auth-delegator)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self.authorizer = Authorizer(api_client)

    async def sign_in(self, token: str) -> tuple[str | None, str]:
        """The user name the token stands for, or None and why not."""
        try:
            user = await self.authorizer.authenticate(token)
        except Exception as exc:  # the view may not review tokens, the API server is down
            log.warning("sign-in: the TokenReview failed: %s", _reason(exc))
            return None, f"The view could not check the token with Kubernetes ({_reason(exc)})."
        if user is None:
            return None, "Kubernetes did not accept this token."
        return str(user.get("username") or "?"), ""

    async def viewer(self, *, session: Session | None, csrf: str, namespace: str) -> Viewer:
        """What the page of a flow in ``namespace`` offers its viewer."""
        if session is None:
            return Viewer(csrf=csrf)
        try:
            await self.authorizer.check(Caller(token=session.token), verb=VERB, namespace=namespace)
        except TaskflowError as exc:
            if exc.code == "Unauthorized":
                why = "Kubernetes no longer accepts your token: sign in again."
            else:
                why = f"{session.username} may not {VERB} taskflows in namespace {namespace}."
            return Viewer(csrf=session.csrf, username=session.username, why_not=why)
        except Exception as exc:
            log.warning("checking %s's rights: %s", session.username, _reason(exc))
            return Viewer(
                csrf=session.csrf,
                username=session.username,
                why_not=f"The view could not check your rights with Kubernetes ({_reason(exc)}).",
            )
        return Viewer(csrf=session.csrf, username=session.username, may_act=True, why_not="")

    def user_api_client(self, token: str) -> k8s.ApiClient:
        """A Kubernetes connection to the same API server as the view's, as the token's user:
        the view's own credentials (client certificate, token, its refresh) are left out."""
        cfg: Any = copy.deepcopy(self.api_client.configuration)
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.refresh_api_key_hook = None
        cfg.cert_file = None
        cfg.key_file = None
        cfg.username = None
        cfg.password = None
        return k8s.ApiClient(cfg)


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    status = getattr(exc, "status", None)
    if reason:
        return f"{status} {reason}" if status else str(reason)
    return type(exc).__name__

"""Taskflow: a Kubernetes operator that runs multi-stage plans of NATS requests.

The public surface is small: the resource models (``taskflow.api``), the client
(``taskflow.client``) and the service SDK (``taskflow.sdk``). Everything else is
the operator's inside.
"""

__version__ = "0.1.0"

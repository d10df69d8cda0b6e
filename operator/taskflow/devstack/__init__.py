"""Real servers on loopback for tests, ``make dev`` and ``make bench``: etcd + kube-apiserver
(the envtest way, no kubelet) and nats-server with JetStream. Nothing here is a fake.
"""

from taskflow.devstack.servers import ControlPlane, DevStack, NatsServer, find_binaries

__all__ = ["ControlPlane", "DevStack", "NatsServer", "find_binaries"]

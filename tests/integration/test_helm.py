"""The Helm chart on the real test API server.

* ``helm lint``; ``helm template`` with default and non-default values, each applied with
  ``kubectl apply --dry-run=server``; bad values refused by values.schema.json.
* ``helm install`` into the API server and ``helm uninstall`` removing it again.
* The RBAC proof: the chart's ServiceAccount and (Cluster)Roles are created in a private stack, the
  operator runs out of cluster with a token of that ServiceAccount and completes the seed flow, a
  nested flow and a cancel cascade; the same token is refused everything else. The private stack
  (its own kube-apiserver and nats-server) keeps other test modules' operators away from these
  flows, and its API server enforces OwnerReferencesPermissionEnforcement, the strictest setting
  for the owner references of child flows.
* With replicas: 2 (kopf peering, the chart's peering object and RBAC) one replica serves and the
  other takes over; in a pod (no kubeconfig) the operator logs kopf in as its ServiceAccount.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
import yaml
from kubernetes import config

from conftest import ROOT, Flows, Kubectl, OperatorProcess, task_status
from taskflow.devstack import DevStack
from taskflow.devstack import servers as devservers
from taskflow.devstack.servers import free_port

pytestmark = pytest.mark.integration

CHART = ROOT / "charts/taskflow-operator"
# `helm template` has no cluster to ask; the chart needs >= 1.29 (CEL transition rules).
KUBE_VERSION = "1.34.0"
PEERING_CRD = CHART / "crds/kopf.dev_clusterkopfpeerings.yaml"

# A minimal stand-in for the Prometheus Operator's CRD, so the ServiceMonitor can be applied.
SERVICE_MONITOR_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""

# Exactly what the operator may do on Taskflows and Events: see the chart's _helpers.tpl.
EXPECTED_RULES = {
    ("taskflow.dev", "taskflows", None): {"get", "list", "watch", "create", "patch", "delete"},
    ("taskflow.dev", "taskflows/status", None): {"update"},
    ("taskflow.dev", "taskflows/finalizers", None): {"update"},
    ("", "events", None): {"create"},
    ("taskflow.dev", "taskflowpolicies", None): {"get", "list", "watch"},
    ("taskflow.dev", "taskflowtemplates", None): {"get"},
    ("taskflow.dev", "crontaskflows", None): {"get", "list", "watch"},
    ("taskflow.dev", "crontaskflows/status", None): {"update"},
    ("taskflow.dev", "taskflowpolicies/status", None): {"update"},
}
# Cluster-wide only: the cluster's ServiceLimits, read, and their status reported.
EXPECTED_LIMIT_RULES = {
    ("taskflow.dev", "servicelimits", None): {"get", "list", "watch"},
    ("taskflow.dev", "servicelimits/status", None): {"patch"},
}
# Tenants' NATS credentials: Secrets of the release namespace, read only.
EXPECTED_CREDENTIAL_RULES = {("", "secrets", None): {"get"}}
EXPECTED_PEERING_RULES = {
    ("kopf.dev", "clusterkopfpeerings", None): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings", "PEERING"): {"get", "patch"},
}


def helm_binary() -> str:
    path = shutil.which("helm")
    if path is None:
        pytest.fail("helm not found on PATH: run the tests with hack/run-tests.sh")
    return path


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [helm_binary(), *args]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def template(
    tmp_path: Path,
    values: dict[str, Any],
    *,
    release: str = "taskflow",
    namespace: str = "taskflow-system",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(values_file(tmp_path, values)),
        check=check,
    )


def render(tmp_path: Path, values: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(tmp_path, values, **kwargs).stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    result: dict[str, Any] = pod["containers"][0]
    return result


def rule_set(rules: list[dict[str, Any]], peering: str = "") -> dict[Any, set[str]]:
    out: dict[Any, set[str]] = {}
    for rule in rules:
        names = rule.get("resourceNames") or [None]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in names:
                    key = (group, resource, "PEERING" if name and name == peering else name)
                    out.setdefault(key, set()).update(rule["verbs"])
    return out


def new_namespace(kubectl: Kubectl, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    return name


@pytest.fixture(scope="module")
def cluster_crds(kubectl: Kubectl) -> None:
    """The chart's other CRD (kopf peering) and a ServiceMonitor CRD in the shared API server."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PEERING_CRD))
    kubectl("apply", "--server-side", "-f", "-", input=SERVICE_MONITOR_CRD)
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/servicemonitors.monitoring.coreos.com",
    )


# -- chart checks that need no server ---------------------------------------------------------


def test_helm_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_lint_with_every_option_on(tmp_path: Path) -> None:
    values = {
        "replicas": 2,
        "watchNamespaces": ["a", "b"],
        "nats": {
            "url": "tls://nats.nats.svc:4222",
            "auth": {"type": "creds", "existingSecret": "nats-creds"},
            "tls": {
                "enabled": True,
                "existingSecret": "nats-tls",
                "caKey": "ca.crt",
                "certKey": "tls.crt",
                "keyKey": "tls.key",
            },
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "signingKey": {"existingSecret": "taskflow-key"},
    }
    helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, values)))


def test_chart_crds_and_policies_are_the_generated_ones() -> None:
    from taskflow.api.generate import outputs

    for path, text in outputs().items():
        assert (ROOT / path).read_text() == text, f"{path} drifted: run make generate"


def test_chart_admission_policy_is_the_generated_one(tmp_path: Path) -> None:
    from taskflow.api import admission

    docs = render(tmp_path, {})
    rendered = {
        (d["kind"], d["metadata"]["name"]): d
        for d in docs
        if d["kind"].startswith("ValidatingAdmissionPolicy")
    }
    prefix = "taskflow-system-taskflow-taskflow-operator"
    wanted = {}
    for suffix, objects in (
        ("parent-links", admission.policy()),
        ("tenant-policy", admission.tenant_policy()),
    ):
        name = f"{prefix}-{suffix}"
        for want in objects:
            wanted[(want["kind"], name)] = {
                **want["spec"],
                **({"policyName": name} if "policyName" in want["spec"] else {}),
            }
    assert {key: doc["spec"] for key, doc in rendered.items()} == wanted
    required = render(tmp_path, {"tenancy": {"requirePolicy": True}})
    (binding,) = [
        d
        for d in required
        if d["kind"] == "ValidatingAdmissionPolicyBinding" and "paramRef" in d["spec"]
    ]
    assert binding["spec"]["paramRef"]["parameterNotFoundAction"] == "Deny"
    assert "--require-policy" in container(required)["args"]
    narrowed = render(tmp_path, {"tenancy": {"credentialSecrets": ["nats-team-a"]}})
    (role,) = [d for d in narrowed if d["kind"] == "Role"]
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["nats-team-a"],
            "verbs": ["get"],
        }
    ]
    assert not [
        d
        for d in render(tmp_path, {"admissionPolicy": {"enabled": False}})
        if d["kind"].startswith("ValidatingAdmissionPolicy")
    ]


def test_default_deployment_is_locked_down(tmp_path: Path) -> None:
    docs = render(tmp_path, {})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(docs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--health-address=0.0.0.0:8080" in c["args"]
    assert "--metrics-address=0.0.0.0:9464" in c["args"]
    assert not any(a.startswith(("--peering", "--namespace")) for a in c["args"])
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    # cluster-wide by default, with exactly the operator's rules
    role = one(docs, "ClusterRole")
    assert rule_set(role["rules"]) == EXPECTED_RULES | EXPECTED_LIMIT_RULES
    assert "--service-limits=off" not in c["args"]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "taskflow-taskflow-operator",
            "namespace": "taskflow-system",
        }
    ]
    assert not [d for d in docs if d["kind"] in ("ClusterKopfPeering", "ServiceMonitor")]
    # Only the credentials Role is namespaced: Secrets of the release namespace, read only.
    (credentials,) = [d for d in docs if d["kind"] == "Role"]
    assert credentials["metadata"]["namespace"] == "taskflow-system"
    assert rule_set(credentials["rules"]) == EXPECTED_CREDENTIAL_RULES
    assert "--credentials-namespace=taskflow-system" in c["args"]
    assert "--require-policy" not in c["args"]
    service = one(docs, "Service", "taskflow-taskflow-operator-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_namespaced_rbac_has_no_cluster_role(tmp_path: Path) -> None:
    docs = render(tmp_path, {"watchNamespaces": ["team-a", "team-b"]})
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [
        d
        for d in docs
        if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-credentials")
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_set(role["rules"]) == EXPECTED_RULES
    bindings = [
        d
        for d in docs
        if d["kind"] == "RoleBinding" and not d["metadata"]["name"].endswith("-credentials")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    args = container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--service-limits=off" in args  # (ServiceLimits are cluster-scoped)


@pytest.mark.parametrize(
    ("auth", "flag", "file", "key"),
    [
        ("userPassword", "--nats-password-file", "password", "pw"),
        ("token", "--nats-token-file", "token", "tok"),
        ("creds", "--nats-creds-file", "nats.creds", "user.creds"),
        ("nkey", "--nats-nkey-file", "nkey.seed", "seed"),
    ],
)
def test_credentials_are_files_from_the_existing_secret(
    tmp_path: Path, auth: str, flag: str, file: str, key: str
) -> None:
    keys = {
        "userPassword": "passwordKey",
        "token": "tokenKey",
        "creds": "credsKey",
        "nkey": "nkeyKey",
    }
    docs = render(
        tmp_path, {"nats": {"auth": {"type": auth, "existingSecret": "nats-auth", keys[auth]: key}}}
    )
    c = container(docs)
    assert f"{flag}=/etc/taskflow/nats-auth/{file}" in c["args"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "nats-auth"]
    assert volume["secret"]["secretName"] == "nats-auth"
    assert volume["secret"]["items"] == [{"key": key, "path": file}]
    assert {"name": "nats-auth", "mountPath": "/etc/taskflow/nats-auth", "readOnly": True} in c[
        "volumeMounts"
    ]
    # nothing secret in plain env values: only the user name comes from the Secret, by reference
    plain = {e["name"] for e in c["env"] if "value" in e}
    assert plain == {"PYTHONUNBUFFERED"}
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    if auth == "userPassword":
        (user,) = [e for e in c["env"] if e["name"] == "NATS_USER"]
        assert user["valueFrom"]["secretKeyRef"] == {"name": "nats-auth", "key": "username"}


def test_tls_files_from_a_secret(tmp_path: Path) -> None:
    docs = render(
        tmp_path,
        {
            "nats": {
                "url": "tls://nats:4222",
                "tls": {
                    "enabled": True,
                    "existingSecret": "nats-client-tls",
                    "certKey": "tls.crt",
                    "keyKey": "tls.key",
                },
            }
        },
    )
    c = container(docs)
    assert {
        "--nats-tls-ca=/etc/taskflow/nats-tls/ca.crt",
        "--nats-tls-cert=/etc/taskflow/nats-tls/tls.crt",
        "--nats-tls-key=/etc/taskflow/nats-tls/tls.key",
    } <= set(c["args"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "nats-tls"]
    assert volume["secret"]["items"] == [
        {"key": "ca.crt", "path": "ca.crt"},
        {"key": "tls.crt", "path": "tls.crt"},
        {"key": "tls.key", "path": "tls.key"},
    ]


def test_signing_key_file_from_a_secret(tmp_path: Path) -> None:
    assert not any(a.startswith("--key-file") for a in container(render(tmp_path, {}))["args"])
    docs = render(tmp_path, {"signingKey": {"existingSecret": "taskflow-key"}})
    assert "--key-file=/etc/taskflow/key/key" in container(docs)["args"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "key"]
    assert volume["secret"] == {
        "secretName": "taskflow-key",
        "defaultMode": 0o440,
        "items": [{"key": "key", "path": "key"}],
    }


def test_replicas_run_with_kopf_peering(tmp_path: Path) -> None:
    docs = render(tmp_path, {"replicas": 2})
    peering = "taskflow-system-taskflow-taskflow-operator"
    assert f"--peering={peering}" in container(docs)["args"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == peering
    role = one(docs, "ClusterRole", f"{peering}-peering")
    assert rule_set(role["rules"], peering) == EXPECTED_PEERING_RULES
    one(docs, "ClusterRoleBinding", f"{peering}-peering")


def test_service_monitor_is_optional(tmp_path: Path) -> None:
    docs = render(
        tmp_path, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    )
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    docs = render(tmp_path, {"metrics": {"enabled": False}})
    assert not [
        d
        for d in docs
        if d["kind"] == "ServiceMonitor" or d["metadata"]["name"].endswith("-metrics")
    ]
    assert "--metrics-address=" in container(docs)["args"]


def test_nats_api_is_off_by_default_and_authorizes_callers_when_on(tmp_path: Path) -> None:
    docs = render(tmp_path, {})
    assert not [
        a for a in container(docs)["args"] if a.startswith(("--api-namespaces", "--nats-api"))
    ]
    assert not [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "system:auth-delegator"
    ]
    docs = render(tmp_path, {"natsApi": {"enabled": True}})
    assert "--nats-api=on" in container(docs)["args"]
    (delegate,) = [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "system:auth-delegator"
    ]
    assert delegate["subjects"][0]["kind"] == "ServiceAccount"
    args = container(
        render(
            tmp_path,
            {"watchNamespaces": ["a", "b"], "natsApi": {"enabled": True, "namespaces": ["b"]}},
        )
    )["args"]
    assert {"--nats-api=on", "--api-namespaces=b"} <= set(args)
    assert "--nats-api-users" not in args
    args = container(render(tmp_path, {"natsApi": {"enabled": True, "natsUsers": True}}))["args"]
    assert "--nats-api-users" in args


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": "two"}, "replicas"),
        ({"replicas": -1}, "replicas"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"replica": 2}, "replica"),  # a typo is an unknown key, not silently ignored
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"watchNamespaces": "team-a"}, "watchNamespaces"),
        ({"nats": {"url": "http://nats:4222"}}, "url"),
        ({"nats": {"auth": {"type": "kerberos"}}}, "type"),
        ({"nats": {"auth": {"type": "token"}}}, "existingSecret"),
        ({"nats": {"auth": {"type": "none", "password": "hunter2"}}}, "password"),
        (
            {"nats": {"tls": {"enabled": True, "existingSecret": "t", "certKey": "tls.crt"}}},
            "keyKey",
        ),
        ({"subjectTemplate": "{actionName}"}, "subjectTemplate"),
        ({"subjectTemplate": "svc.>.{serviceId}"}, "subjectTemplate"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"watchNamespaces": ["a"], "natsApi": {"namespaces": ["b"]}}, "natsApi.namespaces"),
        ({"natsApi": {"enabled": "yes"}}, "enabled"),
    ],
)
def test_bad_values_fail_at_template(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    result = template(tmp_path, values, check=False)
    assert result.returncode != 0, f"accepted {values}: {result.stdout[:500]}"
    assert message in result.stderr, result.stderr


# -- the chart on the shared test API server -------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["default", "namespaced", "credentials-tls", "replicas-2", "monitoring", "no-metrics"],
)
def test_template_applies_with_server_dry_run(
    kubectl: Kubectl, cluster_crds: None, tmp_path: Path, variant: str
) -> None:
    release_ns = new_namespace(kubectl, "tf-system")
    values: dict[str, Any] = {
        "default": {},
        "namespaced": {
            "watchNamespaces": [new_namespace(kubectl, "team-a"), new_namespace(kubectl, "team-b")]
        },
        "credentials-tls": {
            "nats": {
                "url": "tls://nats-1.nats.svc:4222,tls://nats-2.nats.svc:4222",
                "auth": {"type": "userPassword", "existingSecret": "nats-user"},
                "tls": {
                    "enabled": True,
                    "existingSecret": "nats-tls",
                    "certKey": "tls.crt",
                    "keyKey": "tls.key",
                },
            }
        },
        "replicas-2": {"replicas": 2, "watchNamespaces": [new_namespace(kubectl, "team-c")]},
        "monitoring": {
            "metrics": {"serviceMonitor": {"enabled": True}},
            "logFormat": "text",
            "logLevel": "DEBUG",
            "subjectTemplate": "svc.{serviceId}.{actionName}",
        },
        "no-metrics": {"metrics": {"enabled": False}, "serviceAccount": {"name": "tf-op"}},
    }[variant]
    # the release namespace enforces the "restricted" Pod Security Standard
    kubectl(
        "label",
        "namespace",
        release_ns,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )
    manifest = template(tmp_path, values, namespace=release_ns).stdout
    result = kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout
    assert "deployment.apps/taskflow-taskflow-operator created (server dry run)" in result.stdout
    assert "PodSecurity" not in result.stderr, result.stderr
    # ...and the Deployment's pod itself is admitted there
    template_ = one(docs, "Deployment")["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template_["metadata"], "name": "operator-pod", "namespace": release_ns},
        "spec": template_["spec"],
    }
    kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Path]:
    """A kube-apiserver of its own without any CRD: Helm has to install the chart's crds/."""
    bins = devservers.find_binaries(("etcd", "kube-apiserver"))
    plane = devservers.ControlPlane(tmp_path / "fresh", bins["etcd"], bins["kube-apiserver"])
    try:
        plane.start()
        assert plane.kubeconfig is not None
        yield plane.kubeconfig
    finally:
        plane.stop()


def install_and_uninstall(
    kubeconfig: Path, tmp_path: Path, values: dict[str, Any], watched: str | None = None
) -> None:
    kubectl = Kubectl(kubeconfig)
    ns = f"taskflow-system-{uuid.uuid4().hex[:6]}"
    result = helm(
        "install",
        "taskflow",
        str(CHART),
        "--namespace",
        ns,
        "--create-namespace",
        "-f",
        str(values_file(tmp_path, values)),
        kubeconfig=kubeconfig,
    )
    assert "STATUS: deployed" in result.stdout
    assert "kubectl apply" in result.stdout  # NOTES.txt tells how to apply the example
    status = json.loads(
        helm("status", "taskflow", "-n", ns, "-o", "json", kubeconfig=kubeconfig).stdout
    )
    assert status["info"]["status"] == "deployed"
    deployment = json.loads(
        kubectl("get", "deployment", "taskflow-taskflow-operator", "-n", ns, "-o", "json").stdout
    )
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == "taskflow-taskflow-operator"
    )
    kubectl(
        "get",
        "serviceaccount/taskflow-taskflow-operator",
        "service/taskflow-taskflow-operator-metrics",
        "-n",
        ns,
    )
    kubectl("get", "crd", "taskflows.taskflow.dev", "clusterkopfpeerings.kopf.dev")
    if watched is None:
        kubectl(
            "get",
            f"clusterrole/{ns}-taskflow-taskflow-operator",
            f"clusterrolebinding/{ns}-taskflow-taskflow-operator",
        )
    else:
        kubectl(
            "get",
            "role/taskflow-taskflow-operator",
            "rolebinding/taskflow-taskflow-operator",
            "-n",
            watched,
        )
    if values.get("replicas", 1) > 1:
        kubectl(
            "get",
            f"clusterkopfpeering/{ns}-taskflow-taskflow-operator",
            f"clusterrole/{ns}-taskflow-taskflow-operator-peering",
        )

    helm("uninstall", "taskflow", "-n", ns, "--wait", kubeconfig=kubeconfig)
    listed = json.loads(helm("list", "-n", ns, "-o", "json", kubeconfig=kubeconfig).stdout)
    assert listed == []
    gone = kubectl(
        "get",
        "deployment,serviceaccount,service",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/instance=taskflow",
        "-o",
        "name",
    ).stdout
    assert gone.strip() == ""
    for cluster_scoped in ("clusterrole", "clusterrolebinding"):
        leftover = kubectl(
            "get", cluster_scoped, "-l", "app.kubernetes.io/instance=taskflow", "-o", "name"
        ).stdout
        assert ns not in leftover
    if watched is not None:
        assert (
            "NotFound"
            in kubectl("get", "role/taskflow-taskflow-operator", "-n", watched, check=False).stderr
        )
    assert (
        "NotFound"
        in kubectl("get", f"clusterkopfpeering/{ns}-taskflow-taskflow-operator", check=False).stderr
    )
    # Helm keeps CRDs (and with them every Taskflow) on uninstall.
    kubectl("get", "crd", "taskflows.taskflow.dev", "clusterkopfpeerings.kopf.dev")


def test_helm_install_and_uninstall_on_the_test_apiserver(stack: DevStack, tmp_path: Path) -> None:
    """The session API server already has the Taskflow CRD (the stack applied it): Helm leaves
    it as it is and installs the rest."""
    install_and_uninstall(stack.kubeconfig, tmp_path, {})


def test_helm_install_into_a_cluster_without_the_crds(fresh_cluster: Path, tmp_path: Path) -> None:
    """`helm install` alone installs the CRDs too; here with the non-default options."""
    kubectl = Kubectl(fresh_cluster)
    for crd in ("taskflows.taskflow.dev", "clusterkopfpeerings.kopf.dev"):
        assert "NotFound" in kubectl("get", "crd", crd, check=False).stderr
    watched = new_namespace(kubectl, "flows")
    install_and_uninstall(
        fresh_cluster,
        tmp_path,
        {
            "replicas": 2,
            "watchNamespaces": [watched],
            "nats": {"auth": {"type": "token", "existingSecret": "nats-token"}},
        },
        watched=watched,
    )
    crd = json.loads(kubectl("get", "crd", "taskflows.taskflow.dev", "-o", "json").stdout)
    assert crd["spec"]["names"]["shortNames"] == ["tf"]


def test_helm_install_refuses_bad_values(stack: DevStack, kubectl: Kubectl) -> None:
    ns = f"taskflow-bad-{uuid.uuid4().hex[:6]}"
    result = helm(
        "install",
        "taskflow",
        str(CHART),
        "--namespace",
        ns,
        "--create-namespace",
        "--set",
        "logFormat=xml",
        "--set-string",
        "replicas=two",
        kubeconfig=stack.kubeconfig,
        check=False,
    )
    assert result.returncode != 0
    assert "replicas" in result.stderr and "logFormat" in result.stderr, result.stderr
    assert (
        kubectl(
            "get", "deployments", "-A", "-l", "app.kubernetes.io/instance=taskflow", "-o", "name"
        ).stdout.strip()
        == ""
    )


# -- RBAC: the chart's ServiceAccount runs the operator, and may do nothing more ---------------


class _StrictServer(devservers.Server):
    """kube-apiserver with OwnerReferencesPermissionEnforcement, as some clusters run it."""

    def start(self) -> None:
        if self.name == "kube-apiserver":
            self.argv = [
                *self.argv,
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            ]
        super().start()


_LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+")
_HTTP_403 = re.compile(r"\b403\b")


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devservers, "Server", _StrictServer)
        stack = DevStack(tmp_path_factory.mktemp("rbac-stack")).start()
    try:
        log = (stack.workdir / "kube" / "kube-apiserver.log").read_text()
        assert "OwnerReferencesPermissionEnforcement" in log
        yield stack
    finally:
        stack.stop()


def identity_kubeconfig(admin: Path, user: dict[str, str], target: Path) -> Path:
    """The admin kubeconfig's cluster with another user's credentials."""
    cfg = yaml.safe_load(admin.read_text())
    cfg["users"] = [{"name": "operator", "user": user}]
    cfg["contexts"] = [
        {"name": "operator", "context": {"cluster": cfg["clusters"][0]["name"], "user": "operator"}}
    ]
    cfg["current-context"] = "operator"
    target.write_text(yaml.safe_dump(cfg))
    target.chmod(0o600)
    return target


def token_user(admin: Kubectl, namespace: str, sa: str) -> dict[str, str]:
    """A TokenRequest token of the ServiceAccount, as the kubelet mounts it into the pod."""
    token = admin("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:{sa}"
    return {"token": token}


def x509_user(stack: DevStack, namespace: str, sa: str) -> dict[str, str]:
    """A client certificate naming the ServiceAccount's user and groups, signed by the cluster
    CA: to RBAC the very same identity as the ServiceAccount's token."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from taskflow.devstack.certs import _cert, _key, _pem_key

    pki = stack.workdir / "kube" / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = _key()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        subject = x509.Name(
            [
                # longer than X.509's advisory 64 characters; the API server does not mind
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"system:serviceaccount:{namespace}:{sa}", _validate=False
                ),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:serviceaccounts"),
                x509.NameAttribute(
                    NameOID.ORGANIZATION_NAME, f"system:serviceaccounts:{namespace}"
                ),
            ]
        )
    cert = _cert(subject=subject, key=key, issuer=ca.subject, signer=ca_key)  # type: ignore[arg-type]

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "client-certificate-data": b64(cert.public_bytes(serialization.Encoding.PEM)),
        "client-key-data": b64(_pem_key(key)),
    }


def fail_fast_on_anonymous_login(operator: OperatorProcess) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        log = operator.log_path.read_text()
        if "Initial authentication has finished" in log:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    if "system:anonymous" in operator.log_path.read_text():
        pytest.fail(
            "kopf talks to the API server anonymously: the operator's kopf login does "
            "not pass on the ServiceAccount token (see Operator.login)"
        )


async def hold_and_echo(url: str, held: list[str]) -> nats.NATS:
    """Two tiny services: ``echo.say`` answers with its params; ``hold.forever`` never answers."""
    nc = await nats.connect(url)

    async def say(msg: Any) -> None:
        data = json.loads(msg.data or b"{}")
        await msg.respond(json.dumps({"success": True, "data": data}).encode())

    async def hold(msg: Any) -> None:
        held.append(msg.subject)

    await nc.subscribe("echo.say", cb=say)
    await nc.subscribe("hold.forever", cb=hold)
    await nc.flush()
    return nc


NESTED = {
    "stages": [
        {
            "name": "outer",
            "tasks": [
                {
                    "name": "child",
                    "type": "TASKFLOW",
                    "taskflow": {
                        "stages": [
                            {
                                "name": "inner",
                                "tasks": [
                                    {
                                        "name": "say",
                                        "params": {"word": "nested"},
                                        "taskDetails": {"serviceId": "echo", "actionName": "say"},
                                    }
                                ],
                            }
                        ]
                    },
                }
            ],
        }
    ],
}
CANCELLABLE = {
    "options": {"timeout": "5m", "maxAge": "10m"},
    "stages": [
        {
            "name": "outer",
            "tasks": [
                {
                    "name": "child",
                    "type": "TASKFLOW",
                    "taskflow": {
                        "stages": [
                            {
                                "name": "inner",
                                "tasks": [
                                    {
                                        "name": "wait",
                                        "params": {},
                                        "taskDetails": {
                                            "serviceId": "hold",
                                            "actionName": "forever",
                                        },
                                    }
                                ],
                            }
                        ]
                    },
                }
            ],
        }
    ],
}
# Things the operator's ServiceAccount must never be allowed to do.
DENIED = [
    ("list", "secrets"),
    ("watch", "secrets"),
    ("list", "configmaps"),
    ("create", "pods"),
    ("delete", "pods"),
    ("delete", "namespaces"),
    ("create", "namespaces"),
    ("update", "taskflows.taskflow.dev"),
    ("deletecollection", "taskflows.taskflow.dev"),
    ("patch", "taskflows.taskflow.dev", "--subresource=status"),
    ("delete", "events"),
    ("list", "events"),
    ("create", "serviceaccounts", "--subresource=token"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("list", "customresourcedefinitions"),
    ("update", "customresourcedefinitions"),
    ("create", "deployments.apps"),
    ("list", "nodes"),
]


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
@pytest.mark.parametrize("credential", ["token", "x509"])
async def test_chart_rbac_runs_the_operator_and_nothing_more(
    private_stack: DevStack, tmp_path: Path, mode: str, credential: str
) -> None:
    """The operator, with exactly the chart's RBAC, completes the seed flow, a nested flow and a
    cancel cascade, and is refused what it must not touch. ``token``: a TokenRequest token of
    the chart's ServiceAccount (what a pod gets). ``x509``: a client certificate for the same
    user and groups, so that the RBAC proof does not depend on how kopf logs in."""
    from taskflow.demo import serve

    admin = Kubectl(private_stack.kubeconfig)
    release_ns = new_namespace(admin, "taskflow-system")
    flows_ns = new_namespace(admin, "flows")
    other_ns = new_namespace(admin, "other")
    watch = [flows_ns] if mode == "namespaced" else []
    docs = render(tmp_path, {"watchNamespaces": watch}, namespace=release_ns)
    rbac = [
        d
        for d in docs
        if d["kind"]
        in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    admin("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    user = (
        token_user(admin, release_ns, sa)
        if credential == "token"
        else x509_user(private_stack, release_ns, sa)
    )
    kubeconfig = identity_kubeconfig(
        private_stack.kubeconfig, user, tmp_path / "operator.kubeconfig"
    )
    as_operator = Kubectl(kubeconfig)
    whoami = json.loads(as_operator("auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert whoami["username"] == f"system:serviceaccount:{release_ns}:{sa}"
    assert {
        "system:serviceaccounts",
        f"system:serviceaccounts:{release_ns}",
        "system:authenticated",
    } <= set(whoami["groups"])

    health = free_port()
    operator = OperatorProcess(
        SimpleNamespace(kubeconfig=kubeconfig, nats=private_stack.nats),  # type: ignore[arg-type]
        tmp_path,
        extra=[
            "--health-address",
            f"127.0.0.1:{health}",
            # the chart's own flags for where the operator looks
            *[a for a in container(docs)["args"] if a.startswith(("--namespace", "--service-"))],
        ],
    )
    api = config.new_client_from_config(str(private_stack.kubeconfig))
    flows = Flows(api, flows_ns)
    demo = asyncio.create_task(serve(private_stack.nats.url))
    held: list[str] = []
    services = await hold_and_echo(private_stack.nats.url, held)
    try:
        await asyncio.to_thread(operator.start)
        await asyncio.to_thread(fail_fast_on_anonymous_login, operator)
        # 1. the seed flow: 11 tasks in two stages, one of them retried
        seed = yaml.safe_load((ROOT / "examples/configure-group.yaml").read_text())
        await flows.create(seed)
        done = await flows.wait("configure-group", timeout=60)
        assert done["status"]["phase"] == "SUCCEEDED", done["status"]
        assert done["status"]["progress"] == "11/11"
        # 2. a nested flow: the operator creates the child (with an owner reference)
        await flows.create({"spec": NESTED}, name="nested")
        done = await flows.wait("nested", timeout=60)
        assert done["status"]["phase"] == "SUCCEEDED", done["status"]
        (child_ref,) = task_status(done, "outer", "child")["nestedTaskflows"]
        child = await flows.get(child_ref.split("/")[-1])
        assert child["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
        assert task_status(child, "inner", "say")["response"] == {"word": "nested"}
        # 3. the cancel cascade: the operator patches spec.cancel into the running child
        await flows.create({"spec": CANCELLABLE}, name="cancel-me")
        await flows.wait("cancel-me", timeout=30, until=lambda b: bool(held))
        await flows.patch("cancel-me", {"spec": {"cancel": True}})
        done = await flows.wait("cancel-me", timeout=60)
        assert done["status"]["phase"] == "CANCELLED", done["status"]
        children = [
            f
            for f in await flows.list()
            if f["metadata"]["name"] != "cancel-me"
            and f["metadata"].get("ownerReferences", [{}])[0].get("name") == "cancel-me"
        ]
        assert len(children) == 1
        child = await flows.wait(
            children[0]["metadata"]["name"],
            timeout=30,
            until=lambda b: (
                b["spec"].get("cancel") is True
                and (b.get("status") or {}).get("phase") == "CANCELLED"
            ),
        )
        # (only the operator touches the child: the test patched the parent alone)
        assert child["status"]["phase"] == "CANCELLED"
        # 4. flow-level Kubernetes Events, posted with the operator's token
        deadline = time.monotonic() + 10
        while True:
            events = json.loads(admin("get", "events", "-n", flows_ns, "-o", "json").stdout)
            sources = {e.get("reportingComponent") for e in events["items"]}
            if "taskflow.dev/operator" in sources or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert "taskflow.dev/operator" in sources, events["items"][:3]
        # the operator's health endpoint works with these permissions
        assert await asyncio.to_thread(_healthz, health)
    finally:
        operator.stop()
        demo.cancel()
        await services.drain()
        api.close()
    log = operator.log_path.read_text()
    # (the timestamp is cut off first: its milliseconds may well read "403")
    messages = [_LOG_STAMP.sub("", line) for line in log.splitlines()]
    forbidden = [
        line
        for line in messages
        if (_HTTP_403.search(line) or "orbidden" in line or "permission" in line.lower())
        and not _kopf_optional_scan(line)
    ]
    assert not forbidden, "\n".join(forbidden[:20])

    # ...and the same token is refused everything it does not need.
    for denied in DENIED:
        for ns in (flows_ns, release_ns):
            answer = as_operator("auth", "can-i", *denied, "-n", ns, check=False)
            assert answer.stdout.strip() == "no", f"{denied} -n {ns}: {answer.stdout}"
    # A Secret by name, in the release namespace only (tenants' NATS credentials).
    for ns, want in ((release_ns, "yes"), (flows_ns, "no"), (other_ns, "no")):
        answer = as_operator("auth", "can-i", "get", "secrets", "-n", ns, check=False)
        assert answer.stdout.strip() == want, f"get secrets -n {ns}: {answer.stdout}"
    for args in (
        ["get", "secrets", "-n", release_ns],
        ["get", "pods", "-n", flows_ns],
        ["delete", "namespace", other_ns, "--wait=false"],
        ["get", "clusterroles"],
    ):
        refused = as_operator(*args, check=False)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, (args, refused)
    allowed_elsewhere = "yes" if mode == "cluster-wide" else "no"
    for verb in ("list", "create", "patch", "delete"):
        answer = as_operator(
            "auth", "can-i", verb, "taskflows.taskflow.dev", "-n", other_ns, check=False
        )
        assert answer.stdout.strip() == allowed_elsewhere, (verb, answer.stdout)
    if mode == "namespaced":
        refused = as_operator("get", "taskflows", "-A", check=False)
        assert "Forbidden" in refused.stderr


def test_in_cluster_login_authenticates_as_the_service_account(
    private_stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod the operator has no kubeconfig: the kubernetes client reads the token the
    kubelet mounted, and the operator hands it to kopf. Here the pod's files and environment are
    made as the kubelet makes them, and the token kopf gets must authenticate as the chart's
    ServiceAccount."""
    from kubernetes.config import incluster_config

    from taskflow.shell.bus import NatsSettings
    from taskflow.shell.handlers import Operator
    from taskflow.shell.settings import RunnerSettings

    admin = Kubectl(private_stack.kubeconfig)
    release_ns = new_namespace(admin, "taskflow-system")
    docs = render(tmp_path, {}, namespace=release_ns)
    admin(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                d
                for d in docs
                if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
            ]
        ),
    )
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    token = token_user(admin, release_ns, sa)["token"]
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "token").write_text(token)
    shutil.copy(private_stack.workdir / "kube" / "pki" / "ca.crt", mounted / "ca.crt")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(mounted / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(mounted / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(private_stack.control_plane.port))
    monkeypatch.delenv("KUBECONFIG", raising=False)

    operator = Operator(kubeconfig=None, nats=NatsSettings(), runner=RunnerSettings())
    info = operator.login()
    assert info.server == private_stack.control_plane.url
    assert info.scheme == "Bearer"
    assert info.token == token  # the bare token: kopf adds the scheme itself
    whoami = subprocess.run(
        [
            "kubectl",
            "--server",
            info.server,
            "--certificate-authority",
            str(info.ca_path),
            "--token",
            info.token,
            "auth",
            "whoami",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert whoami.returncode == 0, whoami.stderr
    user = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert user == f"system:serviceaccount:{release_ns}:{sa}"


def _healthz(port: int) -> bool:
    import urllib.request

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as rsp:
                return bool(rsp.status == 200)
        except OSError:
            time.sleep(0.5)
    return False


def _kopf_optional_scan(line: str) -> bool:
    """kopf's optional cluster scans (CRDs, and namespaces when it watches listed ones): it
    retries them, then does without, as its docs describe. The chart does not grant them: the
    operator serves one resource whose CRD Helm installs first, and knows its namespaces."""
    return "Not enough permissions to" in line or any(
        f'cannot {verb} resource "{resource}"' in line
        for verb in ("list", "watch")
        for resource in ("customresourcedefinitions", "namespaces")
    )


async def test_two_replicas_one_serves_the_other_takes_over(
    private_stack: DevStack, tmp_path: Path
) -> None:
    """replicas: 2 with the chart's peering object and RBAC: one replica serves, the other stands
    by, and takes over when the first one stops."""
    admin = Kubectl(private_stack.kubeconfig)
    admin("apply", "--server-side", "-f", str(PEERING_CRD))
    admin(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/clusterkopfpeerings.kopf.dev"
    )
    release_ns = new_namespace(admin, "taskflow-system")
    flows_ns = new_namespace(admin, "flows")
    docs = render(tmp_path, {"replicas": 2, "watchNamespaces": [flows_ns]}, namespace=release_ns)
    objects = [d for d in docs if d["kind"] not in ("Deployment", "Service")]
    admin("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    args = container(docs)["args"]
    (peering,) = [a for a in args if a.startswith("--peering=")]
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    kubeconfig = identity_kubeconfig(
        private_stack.kubeconfig,
        x509_user(private_stack, release_ns, sa),
        tmp_path / "operator.kubeconfig",
    )
    replicas = []
    for i in range(2):
        log_dir = tmp_path / f"replica-{i}"
        log_dir.mkdir()
        replicas.append(
            OperatorProcess(
                SimpleNamespace(kubeconfig=kubeconfig, nats=private_stack.nats),  # type: ignore[arg-type]
                log_dir,
                extra=[
                    peering,
                    *[a for a in args if a.startswith(("--namespace", "--service-"))],
                    "--log-level=DEBUG",
                ],
            )
        )
    # DEBUG: kopf logs its peering keep-alives only at that level
    api = config.new_client_from_config(str(private_stack.kubeconfig))
    flows = Flows(api, flows_ns)
    services = await hold_and_echo(private_stack.nats.url, [])
    hello = {
        "stages": [
            {
                "name": "s",
                "tasks": [
                    {
                        "name": "say",
                        "params": {"n": 1},
                        "taskDetails": {"serviceId": "echo", "actionName": "say"},
                    }
                ],
            }
        ]
    }
    try:
        for replica in replicas:
            await asyncio.to_thread(replica.start)
        # both replicas keep their records alive in the peering object (kopf's debug log says so)
        deadline = time.monotonic() + 60
        while not all("Keep-alive in" in r.log_path.read_text() for r in replicas):
            assert time.monotonic() < deadline, "the replicas did not join the peering"
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        logs = [r.log_path.read_text() for r in replicas]
        if any("Pausing all operators, including self" in log for log in logs):
            pytest.fail("both replicas paused: they have the same kopf peering priority")
        await flows.create({"spec": hello}, name="first")
        assert (await flows.wait("first", timeout=30))["status"]["phase"] == "SUCCEEDED"
        served = [r.metrics().get("taskflow_dispatches_total", 0) for r in replicas]
        assert sorted(served) == [0, 1], served  # exactly one replica dispatched
        active = replicas[served.index(1)]
        standby = replicas[served.index(0)]
        active.stop()  # a graceful stop withdraws its peering record
        await flows.create({"spec": hello}, name="second")
        assert (await flows.wait("second", timeout=60))["status"]["phase"] == "SUCCEEDED"
        assert standby.metrics().get("taskflow_dispatches_total", 0) == 1
    finally:
        for replica in replicas:
            replica.stop()
        await services.drain()
        api.close()
    for replica in replicas:
        denied = [
            line
            for line in replica.log_path.read_text().splitlines()
            if "orbidden" in line and not _kopf_optional_scan(line)
        ]
        assert not denied, denied[:5]


def test_the_expression_webhook_is_served_with_a_certificate_helm_makes(tmp_path: Path) -> None:
    from taskflow.api import admission

    docs = render(tmp_path, {})
    config = one(docs, "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    want = admission.expression_webhook(client_config={})["webhooks"][0]
    assert {k: v for k, v in hook.items() if k != "clientConfig"} == {
        k: v for k, v in want.items() if k != "clientConfig"
    }
    secret = one(docs, "Secret", "taskflow-taskflow-operator-webhook")
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert hook["clientConfig"]["service"] == {
        "name": "taskflow-taskflow-operator-webhook",
        "namespace": "taskflow-system",
        "path": "/validate-taskflow",
        "port": 443,
    }
    args = container(docs)["args"]
    assert "--webhook-address=0.0.0.0:9443" in args
    assert "--webhook-cert-file=/etc/taskflow/webhook/tls.crt" in args
    off = render(tmp_path, {"webhook": {"enabled": False}})
    assert not [d for d in off if d["kind"] == "ValidatingWebhookConfiguration"]
    assert not [a for a in container(off)["args"] if a.startswith("--webhook")]


def test_active_replicas_render_buckets_and_lease_rights_and_no_peering(tmp_path: Path) -> None:
    docs = render(tmp_path, {"replicas": 3, "replicaMode": "active", "buckets": 24})
    args = container(docs)["args"]
    assert "--replica-mode=active" in args and "--buckets=24" in args
    assert not [a for a in args if a.startswith("--peering")]
    assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    (role,) = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-buckets")
    ]
    assert rule_set(role["rules"]) == {
        ("coordination.k8s.io", "leases", None): {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "delete",
        }
    }
    assert role["metadata"]["namespace"] == "taskflow-system"
    # standby (the default) has none of it
    plain = render(tmp_path, {"replicas": 2})
    assert not [d for d in plain if d["metadata"]["name"].endswith("-buckets")]
    assert not [a for a in container(plain)["args"] if a.startswith("--replica-mode")]

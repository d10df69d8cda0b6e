"""The resource's names, defined once: its API group and version, and each kind's plural.

Everything that builds a URL, an ``apiVersion``, a watch or a CRD reads them from here.
"""

GROUP = "taskflow.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Taskflow"
PLURAL = "taskflows"

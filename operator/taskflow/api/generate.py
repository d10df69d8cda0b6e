"""``make generate``: write the CRD YAML from the models (and the Helm chart's copy), and the
chart's copy of the admission policy."""

from __future__ import annotations

import sys
from pathlib import Path

from taskflow.api import admission
from taskflow.api.crd import render

POLICY = Path("charts/taskflow-operator/files/parent-links-policy.yaml")
TARGETS = (
    Path("crds/taskflow.dev_taskflows.yaml"),
    Path("charts/taskflow-operator/crds/taskflow.dev_taskflows.yaml"),
)


def main() -> int:
    text = render()
    for target in TARGETS:
        if target.parent.parent.exists() or target.parts[0] == "crds":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
    if POLICY.parent.parent.exists():
        POLICY.parent.mkdir(parents=True, exist_ok=True)
        POLICY.write_text(admission.render())
        print(f"wrote {POLICY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

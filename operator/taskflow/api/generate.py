"""``make generate``: write the CRD YAML from the models (and the Helm chart's copy), and the
chart's copy of the admission policy."""

from __future__ import annotations

import sys
from pathlib import Path

from taskflow.api import admission
from taskflow.api.crd import all_crds, render

CHART = Path("charts/taskflow-operator")


def outputs() -> dict[Path, str]:
    """Every generated file, by path (relative to the repository)."""
    files: dict[Path, str] = {}
    for name, definition in all_crds().items():
        text = render(definition)
        files[Path(f"crds/taskflow.dev_{name}.yaml")] = text
        files[CHART / f"crds/taskflow.dev_{name}.yaml"] = text
    files[CHART / "files/parent-links-policy.yaml"] = admission.render()
    files[CHART / "files/tenant-policy.yaml"] = admission.render(admission.tenant_policy())
    files[CHART / "files/expression-webhook.yaml"] = admission.render_one(
        admission.expression_webhook(client_config={})
    )
    return files


def main() -> int:
    for target, text in outputs().items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

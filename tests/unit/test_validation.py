"""The corpus of invalid manifests (``tests/invalid/``) is well formed: each says what the
server's error must name."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import ROOT

INVALID = sorted((ROOT / "tests" / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (.+)$")


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    match = EXPECT.match(first)
    assert match, f"{path.name}: the first line must be '# expect: <substring>'"
    return match.group(1).strip()


def test_corpus_is_well_formed() -> None:
    assert len(INVALID) >= 32
    for path in INVALID:
        assert re.fullmatch(r"\d\d-[a-z0-9-]+\.yaml", path.name), path.name
        assert expected(path)
        body = yaml.safe_load(path.read_text())
        assert body["apiVersion"] == "taskflow.dev/v1alpha1", path.name
        assert body["kind"] == "Taskflow", path.name
        assert "namespace" not in body["metadata"], path.name
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in INVALID]
    assert len(names) == len(set(names))


# -- valid manifests --------------------------------------------------------------------------


# -- updates ----------------------------------------------------------------------------------

"""Profile the running operator with py-spy (sampling, by pid, non-blocking) and summarise
where its time goes: self and inclusive share per function."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, duration: float, rate: int = 97) -> subprocess.Popen[bytes] | None:
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--nonblocking",
            "--gil",
            "--rate",
            str(rate),
            "--duration",
            str(int(duration)),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match.group("file")
    for marker in ("site-packages/", "operator/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match.group('fn')} ({file})"


def summarise(raw: Path, top: int = 40) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_name(f) for f in stack.split(";") if f.strip()]
        # py-spy puts the thread first; frames run outermost to innermost.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    ranked = sorted(total, key=lambda n: (own[n], total[n]), reverse=True)[:top]
    by_total = sorted(total, key=lambda n: total[n], reverse=True)[:top]

    def row(name: str) -> dict[str, Any]:
        return {
            "function": name,
            "self_pct": round(100 * own[name] / samples, 1) if samples else 0,
            "total_pct": round(100 * total[name] / samples, 1) if samples else 0,
        }

    return {
        "samples": samples,
        "top": [row(n) for n in ranked],
        "top_inclusive": [row(n) for n in by_total],
    }


def go_top(profile: Path, lines: int = 40) -> list[str] | None:
    """``go tool pprof -top`` of a Go CPU profile (kube-apiserver), if Go is installed."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None or not profile.exists():
        return None
    out = subprocess.run(
        [go, "tool", "pprof", "-top", "-cum", str(profile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.splitlines()[:lines]

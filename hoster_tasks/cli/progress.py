"""Waiting for a task while drawing its progress (bytes sent of the estimate) on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 30


def bar(done: int, total: int | None, label: str = "") -> str:
    mib = done / (1 << 20)
    if not total:
        return f"{label} {mib:8.1f} MiB"
    frac = min(done / total, 1.0)
    filled = int(frac * BAR_WIDTH)
    return f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:5.1f}% {mib:8.1f} MiB"


def wait_with_progress(result: Any, timeout: float, out: TextIO = sys.stderr, poll: float = 0.5) -> Any:
    """Poll the result backend; PROGRESS meta {dataset, bytes, total} becomes a bar. Raises the task's error."""
    deadline = time.monotonic() + timeout
    drawn = last = ""
    while not result.ready():
        if time.monotonic() > deadline:
            break
        info = result.info if result.state == "PROGRESS" else None
        if isinstance(info, dict) and "bytes" in info:
            line = bar(int(info["bytes"]), info.get("total"), str(info.get("dataset", "")))
            if line != last:  # a pipe gets one line per change, a terminal one redrawn line
                out.write(("\r" if out.isatty() else "") + line + ("" if out.isatty() else "\n"))
                out.flush()
                drawn = last = line
        time.sleep(poll)
    if drawn and out.isatty():
        out.write("\n")
    return result.get(timeout=max(deadline - time.monotonic(), 1), propagate=True)


def replication_summary(result: dict[str, Any]) -> str:
    lines = []
    for item in result.get("results", [result]):
        if "dataset" not in item:
            continue
        target = f"{item.get('target_host', '')}:{item.get('target', '')}"
        lines.append(
            f"{item['dataset']} -> {target}: {item.get('action', '?')}, "
            f"{len(item.get('sent', []))} snapshot(s), {item.get('bytes', 0)} bytes"
        )
        lines += [f"  pruned on target: {s}" for s in item.get("pruned_on_target", [])]
    lines += [f"skipped {s}" for s in result.get("skipped", [])]
    lines += [f"FAILED {f}" for f in result.get("failed", [])]
    return "\n".join(lines) or "nothing to do"

"""Waiting for a task while drawing its progress (bytes sent of the estimate) on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_WIDTH = 30


def bar(done: int, total: int | None, label: str = "") -> str:
    mib = done / (1 << 20)
    if not total:
        return f"{label} {mib:8.1f} MiB"
    frac = min(done / total, 1.0)
    filled = int(frac * BAR_WIDTH)
    return f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:5.1f}% {mib:8.1f} MiB"


FOLLOW_EVERY = 2.0  # seconds between looks for a lost job (jobs.py), while no result arrives
# A pool process killed mid-job: Celery marks the job failed (WorkerLostError) at once, while its lease
# runs out only a lease later and the job is re-queued then. Wait that long for the re-run.
LOST_GRACE_SECONDS = 3 * 60.0


def _worker_lost(result: Any) -> bool:
    return result.state == "FAILURE" and type(result.result).__name__ == "WorkerLostError"


def lost_job_follower(app: Any) -> Callable[[str], str | None]:
    """task id -> the id of the job that re-runs it, if its worker died. Reaps too, so a lost job is found
    even when no other worker is alive to notice. Its Redis client is made on the first look, which a job
    that simply succeeds never needs."""
    client: list[Any] = []

    def follow(task_id: str) -> str | None:
        from hoster_tasks.jobs import reap_lost_jobs, requeued_as
        from hoster_tasks.nodes import known_nodes

        if not client:
            from hoster_tasks.redis_conn import client_from_url
            from hoster_tasks.settings import get_settings

            client.append(client_from_url(get_settings().redis_url, socket_connect_timeout=5))
        reap_lost_jobs(client[0], app, known_nodes(client[0]))
        return requeued_as(client[0], task_id)

    return follow


class _Bar:
    """PROGRESS meta {dataset, bytes, total} drawn as a bar: redrawn in place on a terminal, one line per
    change on a pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last = ""

    def __call__(self, meta: Any) -> None:
        if not isinstance(meta, dict) or meta.get("status") != "PROGRESS":
            return
        info = meta.get("result")
        if not isinstance(info, dict) or "bytes" not in info:
            return
        line = bar(int(info["bytes"]), info.get("total"), str(info.get("dataset", "")))
        if line != self.last:
            tty = self.out.isatty()
            self.out.write(("\r" if tty else "") + line + ("" if tty else "\n"))
            self.out.flush()
            self.last = line

    def end(self) -> None:
        if self.last and self.out.isatty():
            self.out.write("\n")


def _wait_ready(result: Any, seconds: float, on_message: Callable[[Any], None]) -> bool:
    """Block until the task is ready or `seconds` passed, on the result backend's notification (Redis
    pub/sub: every state the worker stores, PROGRESS included, arrives as a message), never by polling."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    if result.ready():
        return True
    try:
        result.get(timeout=max(seconds, 0.01), propagate=False, on_message=on_message)
    except CeleryTimeout:
        return False
    return True


def wait_with_progress(
    result: Any, timeout: float, out: TextIO = sys.stderr, poll: float = FOLLOW_EVERY,
    follow: Callable[[str], str | None] | None = None,
) -> Any:
    """Wait for the result (notified, not polled); PROGRESS meta {dataset, bytes, total} becomes a bar.
    Raises the task's error. A job lost with its worker is followed to the job that re-runs it (said on
    `out`): looked for every `poll` seconds without a result, and once a job failed."""
    if follow is None:
        follow = lost_job_follower(result.app)
    deadline = time.monotonic() + timeout
    draw = _Bar(out)
    lost_since: float | None = None  # when Celery reported the job's pool process lost
    while True:
        remaining = deadline - time.monotonic()
        ready = remaining > 0 and _wait_ready(result, min(poll, remaining), draw)
        succeeded = ready and result.state == "SUCCESS"
        if not succeeded:  # still running, failed, or lost: at most once per `poll` seconds
            new_id = follow(result.id)
            if new_id is not None:
                out.write(f"hoster-tasks: the worker running this job died; re-queued as {new_id}\n")
                out.flush()
                result, lost_since = type(result)(new_id, app=result.app), None
                continue
        if ready and _worker_lost(result):
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since < LOST_GRACE_SECONDS and remaining > 0:
                time.sleep(min(poll, remaining))
                continue
        if ready or time.monotonic() >= deadline:
            break
    draw.end()
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
        settled = item.get("settled") or {}
        lines += [f"  diverged copy kept as: {settled['kept_as']}"] if settled.get("kept_as") else []
        if settled.get("rolled_back_to"):
            lines.append(f"  diverged copy rolled back to {settled['rolled_back_to']}, destroying: "
                         + (", ".join(settled.get("discarded") or []) or "no snapshot"))
    lines += [f"skipped {s}" for s in result.get("skipped", [])]
    lines += [f"FAILED {f}" for f in result.get("failed", [])]
    return "\n".join(lines) or "nothing to do"


def rollback_plan(plan: dict[str, Any]) -> str:
    head = f"rolling {plan['vm']} back to {plan['snapshot']}"
    if not plan["destroys"]:
        return head + ": no newer snapshot is destroyed (changes since the newest snapshot are lost)"
    lines = [head + f" destroys {len(plan['destroys'])} newer snapshot(s):"]
    lines += [f"  {plan['dataset']}@{name}" + (" (replication base)" if name in plan["bases"] else "")
              for name in plan["destroys"]]
    if plan.get("kept_as"):
        lines.append(f"the VM as it is now is first copied to {plan['kept_as']}")
    return "\n".join(lines)


def rollback_summary(out: dict[str, Any]) -> str:
    lines = [f"rolled back: {out['snapshot']}"] + [f"destroyed: {out['dataset']}@{n}" for n in out["destroys"]]
    lines += [f"kept the newer state as: {out['kept_as']}"] if out.get("kept_as") else []
    lines += ["VM stopped first"] if out.get("stopped") else []
    lines += ["VM started again"] if out.get("started") else []
    return "\n".join(lines)

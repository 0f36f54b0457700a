"""Failed replications: which (node, VM, endpoint) last failed, since when, how often; and their retry.

A replication's state hash (keys.replication_state, written by Replicator.record_success/record_failure)
carries, besides `error` and `last_error`:
- `failing_since`: the first failure of the current failing streak (set only when absent), and `attempts`:
  the failures in that streak. A success removes both: the next failure starts a new streak.
- `errorfile:<name>`: one field per ERROR_ file a failure of this dataset was written to (`to_<endpoint>`
  for `vm replicate`, the script name for `replicate-all --script-name`). A success clears this dataset's
  line in each of them: the retry of a failure a named job recorded clears that job's file too.

Listing reads the per-node state indexes (observability.state), never the keyspace.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from hoster_tasks.cli.table import render
from hoster_tasks.nodes import NodeInfo, known_nodes, live_nodes
from hoster_tasks.observability import state

FAILING_SINCE = "failing_since"
ATTEMPTS = "attempts"
ERROR_FILE_PREFIX = "errorfile:"


def error_file_field(name: str) -> str:
    return f"{ERROR_FILE_PREFIX}{name}"


def error_files_of(fields: Iterable[str]) -> list[str]:
    """The ERROR_ file names recorded in a state hash's fields."""
    return sorted(f[len(ERROR_FILE_PREFIX):] for f in fields if f.startswith(ERROR_FILE_PREFIX))


@dataclass(frozen=True)
class FailedReplication:
    node: str
    up: bool  # a failure on a node that is down is listed, but cannot be retried until it is back
    vm: str
    dataset: str
    endpoint: str
    error: str
    since: float | None
    last_failure: float | None
    attempts: int
    error_files: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_files": list(self.error_files)}


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _vm_name(node: NodeInfo | None, dataset: str) -> str:
    """The VM's name as its node publishes it; the dataset's last component for a node that is down."""
    if node is not None:
        for vm in node.vms:
            if vm.dataset == dataset:
                return vm.name
    return dataset.rsplit("/", 1)[-1]


def _row(node: str, info: NodeInfo | None, dataset: str, endpoint: str, data: Mapping[str, str]) -> FailedReplication:
    since = _float(data.get(FAILING_SINCE)) or _float(data.get("last_failure"))  # a streak begun before the field
    attempts = data.get(ATTEMPTS) or "1"
    return FailedReplication(
        node=node, up=info is not None, vm=_vm_name(info, dataset), dataset=dataset, endpoint=endpoint,
        error=data.get("last_error", ""), since=since, last_failure=_float(data.get("last_failure")),
        attempts=int(attempts) if attempts.isdigit() else 1, error_files=tuple(error_files_of(data)),
    )


def failed_replications(
    client: redis.Redis, endpoint: str | None = None, vm: str | None = None
) -> list[FailedReplication]:
    """Every (node, dataset, endpoint) whose last replication failed, oldest failing first. `endpoint` is a
    target's configured name (as the state records it)."""
    live = {n.name: n for n in live_nodes(client)}
    rows = []
    for node in known_nodes(client):
        for (dataset, target), data in state.replication_states(client, node).items():
            if data.get("error") != "1" or (endpoint is not None and target != endpoint):
                continue
            row = _row(node, live.get(node), dataset, target, data)
            if vm is None or row.vm == vm:
                rows.append(row)
    return sorted(rows, key=lambda r: (r.since or 0, r.node, r.vm, r.endpoint))


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    secs = max(int(now - ts), 0)
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m ago" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s ago"


def render_failed(rows: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    from hoster_tasks.observability.status import error_summary

    now = time.time() if now is None else now
    if not rows:
        return "no failed replications"
    body = [(r["node"] + ("" if r["up"] else " (down)"), r["vm"], r["endpoint"], _age(r["since"], now),
             r["attempts"], error_summary(r["error"])) for r in rows]
    return render("Failed Replications", ("Node", "VM", "Endpoint", "Failing Since", "Attempts", "Error"), body,
                  right=(4,))


def render_retries(rows: Sequence[Mapping[str, Any]]) -> str:
    """What `vm retry --failed` did per (node, VM, endpoint): the outcome, or why it was not queued."""
    if not rows:
        return "no failed replications to retry"
    from hoster_tasks.observability.status import error_summary

    body = [(r["node"], r["vm"], r["endpoint"], r["outcome"], error_summary(r.get("error") or "")) for r in rows]
    return render("Retried Replications", ("Node", "VM", "Endpoint", "Outcome", "Error"), body)


@dataclass(frozen=True)
class Retry:
    """One failed replication queued again (`result`), or not queued and why (`skipped`)."""

    failure: FailedReplication
    result: Any = None  # celery AsyncResult
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.failure.as_dict(), "task_id": self.result.id if self.result is not None else None,
                "skipped": self.skipped}

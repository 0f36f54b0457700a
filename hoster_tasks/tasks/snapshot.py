"""hoster.snapshot.*: take, take_all, fanout, list, destroy."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import Busy
from hoster_tasks.nodes import inventory, live_nodes
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.redis_conn import redis_client
from hoster_tasks.requests import (
    DestroyRequest,
    ListRequest,
    SnapshotFanoutRequest,
    TakeAllRequest,
    TakeRequest,
)
from hoster_tasks.snapshots import NodeContext, describe, destroy_one, take
from hoster_tasks.tasks.base import NodeTask, PublicTask


def _ctx(task: NodeTask) -> NodeContext:
    return NodeContext(task.settings, task.shell, task.caps, task.redis)


# Waiting is bounded by lock_wait_seconds, not by a count: Celery would otherwise stop at its default
# max_retries (3) with its own MaxRetriesExceededError after a few seconds.
UNBOUNDED_RETRIES = sys.maxsize


def _wait_busy(task: NodeTask, exc: Busy, first_try: float | None, **kwargs: Any) -> Exception:
    """Wait for a busy dataset by retrying (the worker slot is free meanwhile), up to lock_wait_seconds;
    then fail with the project's own Busy error."""
    first_try = first_try or time.time()
    waited = time.time() - first_try
    if waited < task.settings.lock_wait_seconds:
        countdown = min(1.0, task.settings.lock_wait_seconds - waited)
        return task.retry(args=[], kwargs={**kwargs, "first_try": first_try}, countdown=countdown,
                          max_retries=UNBOUNDED_RETRIES)
    return Busy(f"{exc} (waited {waited:.0f}s)", exc.datasets, exc.taken)


@app.task(name="hoster.snapshot.take", base=NodeTask, bind=True, request_model=TakeRequest)
def take_snapshot(
    self: NodeTask, vm: str, stype: str = "custom", keep: int | None = None, first_try: float | None = None
) -> dict[str, Any]:
    """Snapshot one VM; with `keep`, prune that VM's snapshots of `stype` to the newest `keep` (deferred
    while the VM is replicating). Taken at once even while the VM replicates."""
    info = self.own_vm(vm)
    report_context(vm=vm, dataset=info.dataset, node=self.settings.node_name)
    try:
        return take(_ctx(self), [info.dataset], stype, keep, datetime.now(UTC))
    except Busy as exc:  # a rollback of this VM is running
        raise _wait_busy(self, exc, first_try, vm=vm, stype=stype, keep=keep) from None


@app.task(name="hoster.snapshot.take_all", base=NodeTask, bind=True, request_model=TakeAllRequest)
def take_all(
    self: NodeTask, stype: str, keep: int, only: list[str] | None = None, first_try: float | None = None,
    slot: int | None = None,
) -> dict[str, Any]:
    """Snapshot every VM this node owns (backup copies of other nodes' VMs are left alone), at once even
    while some replicate; their pruning is deferred to the replication's end (`deferred`). A dataset being
    rolled back is retried alone (`only`) until lock_wait_seconds."""
    vms, stale = self.owned_vms(inventory(self.shell, self.settings, self.caps))
    datasets = [v.dataset for v in vms if only is None or v.dataset in only]
    report_context(node=self.settings.node_name, dataset=",".join(datasets))
    try:
        result = take(_ctx(self), datasets, stype, keep, datetime.now(UTC), slot)
    except Busy as exc:  # datasets being rolled back: retried alone, the others are not snapshotted twice
        raise _wait_busy(self, exc, first_try, stype=stype, keep=keep, only=exc.datasets, slot=slot) from None
    return {"node": self.settings.node_name, **result, "superseded": stale}


@app.task(name="hoster.snapshot.fanout", base=PublicTask, bind=True, request_model=SnapshotFanoutRequest)
def fanout(self: Any, stype: str, keep: int, slot: int | None = None) -> dict[str, str]:
    """Beat's entry point: one take_all per live node, each on that node's own queue. Its Crons check-in
    closes when the last take_all ends, not when this returns (observability/crons.py)."""
    from hoster_tasks.errors import NoLiveNode
    from hoster_tasks.observability.crons import FanoutCheckin
    from hoster_tasks.settings import get_settings

    client = redis_client(get_settings())
    with FanoutCheckin(self, client) as checkin:
        nodes = live_nodes(client)
        if not nodes:  # a schedule that snapshots nothing must not look fine
            raise NoLiveNode("no live node to snapshot")
        headers = checkin.expect(n.name for n in nodes)
        return {
            n.name: take_all.apply_async(
                args=[stype, keep], kwargs={"slot": slot}, queue=keys.node_queue(n.name), headers=headers
            ).id
            for n in nodes
        }


@app.task(name="hoster.snapshot.list", base=NodeTask, bind=True, request_model=ListRequest)
def list_snapshots(self: NodeTask, vm: str | None = None) -> list[dict[str, Any]]:
    from hoster_tasks.zfs import ops

    vms = [self.find_vm(vm)] if vm else inventory(self.shell, self.settings, self.caps)
    snaps = ops.list_snapshots(self.shell, [v.dataset for v in vms], self.caps, self.settings.zfs_command)
    rows = describe(snaps, {v.dataset: v.name for v in vms})
    for row in rows:
        row["node"] = self.settings.node_name
    return rows


@app.task(name="hoster.snapshot.destroy", base=NodeTask, bind=True, request_model=DestroyRequest)
def destroy_snapshot(self: NodeTask, snapshot: str, first_try: float | None = None) -> dict[str, Any]:
    found = inventory(self.shell, self.settings, self.caps)
    for info in found:  # a snapshot of a backup copy is refused by name, before anything runs
        if snapshot.startswith(info.dataset + "@"):
            self.check_owned(info)
    owned = [v.dataset for v in found if v.parent == self.settings.node_name]
    try:
        return destroy_one(_ctx(self), snapshot, owned)
    except Busy as exc:
        raise _wait_busy(self, exc, first_try, snapshot=snapshot) from None

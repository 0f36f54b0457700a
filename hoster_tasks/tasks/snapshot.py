"""hoster.snapshot.*: take, take_all, fanout, list, destroy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.nodes import inventory, live_nodes
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.snapshots import NodeContext, describe, destroy_one, take
from hoster_tasks.tasks.base import NodeTask


def _ctx(task: NodeTask) -> NodeContext:
    return NodeContext(task.settings, task.shell, task.caps, task.redis)


@app.task(name="hoster.snapshot.take", base=NodeTask, bind=True)
def take_snapshot(self: NodeTask, vm: str, stype: str = "custom", keep: int | None = None) -> dict[str, Any]:
    """Snapshot one VM; with `keep`, prune that VM's snapshots of `stype` to the newest `keep`."""
    info = self.find_vm(vm)
    report_context(vm=vm, dataset=info.dataset, node=self.settings.node_name)
    return take(_ctx(self), [info.dataset], stype, keep, datetime.now(UTC))


@app.task(name="hoster.snapshot.take_all", base=NodeTask, bind=True)
def take_all(self: NodeTask, stype: str, keep: int) -> dict[str, Any]:
    """Snapshot every VM this node owns (backup copies of other nodes' VMs are left alone)."""
    vms = [v for v in inventory(self.shell, self.settings) if v.parent == self.settings.node_name]
    report_context(node=self.settings.node_name, dataset=",".join(v.dataset for v in vms))
    result = take(_ctx(self), [v.dataset for v in vms], stype, keep, datetime.now(UTC))
    return {"node": self.settings.node_name, **result}


@app.task(name="hoster.snapshot.fanout", bind=True)
def fanout(self: Any, stype: str, keep: int) -> dict[str, str]:
    """Beat's entry point: one take_all per live node, each on that node's own queue."""
    import redis

    from hoster_tasks.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    sent = {}
    for node in live_nodes(client):
        res = take_all.apply_async(args=[stype, keep], queue=keys.node_queue(node.name))
        sent[node.name] = res.id
    return sent


@app.task(name="hoster.snapshot.list", base=NodeTask, bind=True)
def list_snapshots(self: NodeTask, vm: str | None = None) -> list[dict[str, Any]]:
    from hoster_tasks.zfs import ops

    vms = [self.find_vm(vm)] if vm else inventory(self.shell, self.settings)
    snaps = ops.list_snapshots(self.shell, [v.dataset for v in vms], self.caps, self.settings.zfs_command)
    rows = describe(snaps, {v.dataset: v.name for v in vms})
    for row in rows:
        row["node"] = self.settings.node_name
    return rows


@app.task(name="hoster.snapshot.destroy", base=NodeTask, bind=True)
def destroy_snapshot(self: NodeTask, snapshot: str) -> dict[str, Any]:
    datasets = [v.dataset for v in inventory(self.shell, self.settings)]
    return destroy_one(_ctx(self), snapshot, datasets)

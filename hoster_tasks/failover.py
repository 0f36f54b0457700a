"""Starting a VM on the node that holds its copy (`vm change-parent VM [--start]`, the seed's "Start the VM
on a new host"), and fencing the old direction afterwards.

On the node with the copy, under the dataset lock (no replication can be writing into it):
- refuse while the VM runs here, or while its parent node is live and still owns it (then the VM may run
  there: stop it and move it instead);
- make this node the parent: `hoster-tasks:parent` and Hoster's `parent_host` in vm_config.json;
- `readonly=off`, mount; start the VM when asked;
- record the change in Redis (`keys.vm_owner`).

Fencing: the old parent's replication into this dataset is refused from then on (the copy names another
parent: Replicator.check_owner). When the old parent comes back it finds the record naming it as the
previous parent: it no longer snapshots or replicates its own stale copy, and says so (`superseded`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from hoster_tasks.errors import Permanent
from hoster_tasks.hoster_config import set_parent_host
from hoster_tasks.nodes import NodeInfo, VmInfo, inventory, publish, record_owner
from hoster_tasks.replication.lifecycle import replicate_one
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.snapshots import NodeContext, take
from hoster_tasks.vmctl import VmControl, stop_confirmed
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops


class FailoverRefused(Permanent):
    """A change of parent that could leave two running copies of a VM: nothing was changed."""


def check_can_take_over(vm: VmInfo, node_name: str, ctl: VmControl, live: Sequence[NodeInfo]) -> None:
    if ctl.is_running(vm.name):
        raise FailoverRefused(f"VM {vm.name} is running here already: nothing was changed")
    for node in live:
        if node.name == vm.parent and any(v.name == vm.name and v.parent == node.name for v in node.vms):
            raise FailoverRefused(
                f"node {node.name}, the parent of {vm.name}, is up and still owns it (it may be running there): "
                "stop it there first; nothing was changed")


def change_parent(ctx: NodeContext, ctl: VmControl, vm: VmInfo, live: Sequence[NodeInfo],
                  start: bool, cireset: bool = False) -> dict[str, Any]:
    node = ctx.settings.node_name
    if vm.parent == node:
        return {"vm": vm.name, "dataset": vm.dataset, "parent": node, "changed": False, "started": False}
    check_can_take_over(vm, node, ctl, live)
    with ctx.lock(vm.dataset) as lock:
        key_loaded = load_key_if_needed(ctx, vm)  # before anything changes: no key, no failover
        lock.check()
        ops.set_property(ctx.shell, vm.dataset, ops.PARENT_PROPERTY, node, ctx.zfs)
        ctx.shell.run(cmd.set_writable(vm.dataset, ctx.zfs))
        ctx.shell.run(cmd.mount(vm.dataset, ctx.zfs), check=False)  # already mounted is fine
        mountpoint = ops.get_properties(ctx.shell, [vm.dataset], ["mountpoint"], zfs=ctx.zfs)
        hoster_file = set_parent_host(mountpoint.get(vm.dataset, {}).get("mountpoint", "-"), node)
        record_owner(ctx.redis, vm.name, node, vm.parent)
    vms = inventory(ctx.shell, ctx.settings, ctx.caps)
    publish(ctx.redis, ctx.settings, vms, time.time())  # clients route here now
    reset = ctl.cireset(vm.name) if cireset else None  # Hoster's job: guest settings for the new host
    if start:
        ctl.start(vm.name)
    return {"vm": vm.name, "dataset": vm.dataset, "parent": node, "previous": vm.parent, "changed": True,
            "vm_config_updated": hoster_file, "key_loaded": key_loaded, "cireset": reset, "started": start}


def load_key_if_needed(ctx: NodeContext, vm: VmInfo) -> bool:
    """A copy received raw stays encrypted: load its key from `vm_key_location` (True when loaded)."""
    if not ctx.caps.encryption:
        return False  # this ZFS has no native encryption (zfs-fuse): no dataset can be encrypted
    found = ops.get_properties(ctx.shell, [vm.dataset], ["encryption", "keystatus"], zfs=ctx.zfs).get(vm.dataset, {})
    if found.get("encryption", "off") in ("off", "-") or found.get("keystatus") == "available":
        return False
    location = ctx.settings.vm_key_location
    if location is None:
        raise FailoverRefused(f"{vm.dataset} is encrypted and its key is not loaded: set vm_key_location (e.g. "
                              "file:///root/keys/{vm}.key) or load it (zfs load-key); nothing was changed")
    ctx.shell.run(cmd.load_key(vm.dataset, location.replace("{vm}", vm.name), ctx.zfs))
    return True


def stale_message(vm: VmInfo, new_parent: str) -> str:
    return (f"{vm.dataset}: VM {vm.name} was taken over by node {new_parent} (change-parent) while this node was "
            "away: this copy is stale and is neither snapshotted nor replicated here")


def hand_over(ctx: NodeContext, ctl: VmControl, vm: VmInfo, rep: Replicator, live: Sequence[NodeInfo],
              now: datetime) -> dict[str, Any]:
    """A planned move (`vm move VM --to NODE`), this node's part: stop the VM, take a last snapshot, send
    everything to the new node, then mark this dataset as the new node's copy and say so in the registry.
    The new node's change_parent runs next. A failure before the hand-over starts the VM here again."""
    to = rep.endpoint.name
    if not any(n.name == to for n in live):
        raise FailoverRefused(f"node {to} is not live: nothing was changed")
    running = ctl.is_running(vm.name)
    try:
        if running:
            stop_confirmed(ctl, vm.name, ctx.settings.vm_stop_timeout_seconds)
        take(ctx, [vm.dataset], "custom", None, now)
        sent = replicate_one(rep, vm.dataset)
        with ctx.lock(vm.dataset) as lock:
            lock.check()
            ops.set_property(ctx.shell, vm.dataset, ops.PARENT_PROPERTY, to, ctx.zfs)
            ctx.shell.run(cmd.set_readonly(vm.dataset, ctx.zfs))
    except BaseException:
        if running:
            ctl.start(vm.name)  # the move did not happen: the VM must not stay down
        raise
    vms = inventory(ctx.shell, ctx.settings, ctx.caps)
    publish(ctx.redis, ctx.settings, vms, time.time())  # not the owner any more
    return {"vm": vm.name, "to": to, "was_running": running, "sent": sent["sent"], "bytes": sent["bytes"]}

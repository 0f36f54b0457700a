"""The seed's restore commands: hoster.snapshot.rollback (`hoster snapshot rollback VM SNAPSHOT --force-stop
--force-start`) and hoster.vm.change_parent (`hoster change parent --vm VM`, start the VM on a new host)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from hoster_tasks import keys
from hoster_tasks.celery_app import app
from hoster_tasks.errors import Busy
from hoster_tasks.failover import change_parent, hand_over
from hoster_tasks.nodes import live_nodes
from hoster_tasks.observability.sentry import report_context
from hoster_tasks.requests import ChangeParentRequest, CiresetRequest, MoveRequest, RollbackRequest
from hoster_tasks.restore import RollbackOptions, rollback
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.tasks.base import NodeTask
from hoster_tasks.tasks.chain import ReplicationTask
from hoster_tasks.tasks.snapshot import _wait_busy
from hoster_tasks.vmctl import vm_control

log = logging.getLogger(__name__)


@app.task(name="hoster.snapshot.rollback", base=NodeTask, bind=True, request_model=RollbackRequest)
def rollback_vm(
    self: NodeTask, vm: str, snapshot: str, force_stop: bool = False, force_start: bool = False,
    destroy_base: bool = False, keep_newer: bool = False, dry_run: bool = False,
    expect_destroyed: list[str] | None = None, first_try: float | None = None,
) -> dict[str, Any]:
    """Roll `vm` back to `snapshot` (its short name, or dataset@name); `dry_run` only says what it would
    destroy. A replicating VM is waited for (lock_wait_seconds), then refused as busy."""
    info = self.own_vm(vm)
    short = snapshot.split("@", 1)[1] if "@" in snapshot else snapshot
    if "@" in snapshot and snapshot.split("@", 1)[0] != info.dataset:
        from hoster_tasks.errors import InvalidName

        raise InvalidName(f"{snapshot} is not a snapshot of VM {vm} ({info.dataset})")
    report_context(vm=vm, dataset=info.dataset, node=self.settings.node_name)
    opts = RollbackOptions(force_stop, force_start, destroy_base, keep_newer, dry_run,
                           tuple(expect_destroyed) if expect_destroyed is not None else None)
    ctx = NodeContext(self.settings, self.shell, self.caps, self.redis)
    try:
        return rollback(ctx, vm_control(self.settings), info, short, opts, datetime.now(UTC))
    except Busy as exc:
        raise _wait_busy(self, exc, first_try, vm=vm, snapshot=snapshot, force_stop=force_stop,
                         force_start=force_start, destroy_base=destroy_base, keep_newer=keep_newer,
                         dry_run=dry_run, expect_destroyed=expect_destroyed) from None


@app.task(name="hoster.vm.change_parent", base=NodeTask, bind=True, request_model=ChangeParentRequest)
def change_parent_task(self: NodeTask, vm: str, start: bool = False, cireset: bool = False) -> dict[str, Any]:
    """Failover on the node holding the copy: this node becomes the VM's parent (failover.py)."""
    info = self.find_vm(vm)
    report_context(vm=vm, dataset=info.dataset, node=self.settings.node_name)
    ctx = NodeContext(self.settings, self.shell, self.caps, self.redis)
    return change_parent(ctx, vm_control(self.settings), info, live_nodes(self.redis), start, cireset)


@app.task(name="hoster.vm.cireset", base=NodeTask, bind=True, request_model=CiresetRequest)
def cireset_task(self: NodeTask, vm: str) -> dict[str, Any]:
    """Hoster resets the guest's settings for this host (`hoster vm cireset`): called, its outcome reported."""
    info = self.own_vm(vm)
    return {"vm": vm, "dataset": info.dataset, "cireset": vm_control(self.settings).cireset(vm)}


class MoveTask(ReplicationTask):
    abstract = True
    autoretry_for: tuple[type[Exception], ...] = ()  # a move stops a VM: never retried behind the operator's back


@app.task(name="hoster.vm.move", base=MoveTask, bind=True, request_model=MoveRequest)
def move_vm(self: MoveTask, vm: str, to: str, start: bool = True) -> Any:
    """A planned failover: stop, final sync, hand over (here), then change_parent on `to` (replaces this
    task, so the result is the new parent's). Nothing is lost: the VM was stopped for the last send."""
    info = self.own_vm(vm)
    rep = self.replicator(to, None, self.request.id)
    try:
        done = hand_over(NodeContext(self.settings, self.shell, self.caps, self.redis), vm_control(self.settings),
                         info, rep, live_nodes(self.redis), datetime.now(UTC))
    finally:
        rep.close()
    log.info("handed %s over to %s: %s", vm, rep.endpoint.name, done)
    raise self.replace(change_parent_task.si(vm, start).set(queue=keys.node_queue(rep.endpoint.name)))

"""Rolling a VM back to one of its snapshots (`snapshot rollback VM SNAPSHOT`, the seed's restore).

`zfs rollback -r` destroys every snapshot newer than the one rolled back to, and whatever the VM wrote
since its newest snapshot. So:
- the user is shown exactly what will be destroyed (a dry run) and confirms that list; the real run
  refuses if the list changed in between;
- a running VM is refused unless `force_stop`; the stop is confirmed before the disk is touched;
- with `force_start` the VM is started again afterwards, also when the rollback failed after the stop;
- a replication base among the destroyed snapshots needs `destroy_base`, and the result says what the next
  replication to that target will report;
- `keep_newer` first copies the VM's current state (a fresh snapshot of it) into a new VM dataset
  `<vm>-kept-<time>`, so nothing is lost even by rolling back too far;
- the dataset lock and the snapshot lock are held throughout: no replication, prune or snapshot runs in
  between.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hoster_tasks.errors import InvalidName, RollbackRefused
from hoster_tasks.locks import DatasetLock, wait_for_takers
from hoster_tasks.names import make_snapshot_name
from hoster_tasks.nodes import VmInfo
from hoster_tasks.replication.pipeline import Stage, run_pipeline
from hoster_tasks.snapshots import NodeContext, record_snapshots, replication_bases, run_deferred_prunes
from hoster_tasks.vmctl import VmControl, stop_confirmed
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.parse import Snapshot


@dataclass(frozen=True)
class RollbackPlan:
    target: Snapshot
    destroyed: tuple[Snapshot, ...]  # newer than the target, oldest first: what `zfs rollback -r` destroys
    bases: tuple[Snapshot, ...]  # of those, the replication bases (and snapshots being sent)


@dataclass(frozen=True)
class RollbackOptions:
    force_stop: bool = False
    force_start: bool = False
    destroy_base: bool = False
    keep_newer: bool = False
    dry_run: bool = False
    expect_destroyed: tuple[str, ...] | None = None  # what the user confirmed (short names)


def plan_rollback(snaps: Sequence[Snapshot], short: str, bases: frozenset[int]) -> RollbackPlan:
    """Pure: which snapshots a rollback to `short` destroys."""
    match = [s for s in snaps if s.name == short]
    if not match:
        names = ", ".join(s.name for s in snaps) or "none"
        raise InvalidName(f"no snapshot {short!r} to roll back to (snapshots: {names})")
    target = match[0]
    newer = tuple(sorted((s for s in snaps if s.createtxg > target.createtxg), key=lambda s: s.createtxg))
    return RollbackPlan(target, newer, tuple(s for s in newer if s.guid in bases))


def kept_name(vm: VmInfo, now: datetime) -> str:
    return f"{vm.dataset}-kept-{now.strftime('%Y%m%d-%H%M%S')}"


def rollback(ctx: NodeContext, ctl: VmControl, vm: VmInfo, short: str, opts: RollbackOptions,
             now: datetime) -> dict[str, Any]:
    """Under the dataset and snapshot locks: check, stop, keep, roll back, start. Returns what was done."""
    with ExitStack() as stack:
        lock = stack.enter_context(ctx.lock(vm.dataset))
        stack.enter_context(ctx.lock(vm.dataset, kind="snapshot"))  # no snapshot job starts now
        wait_for_takers(ctx.redis, ctx.settings.node_name, vm.dataset, ctx.settings.lock_attempt_seconds)
        snaps = ops.list_snapshots(ctx.shell, [vm.dataset], ctx.caps, ctx.zfs)[vm.dataset]
        plan = plan_rollback(snaps, short, replication_bases(ctx, [vm.dataset])[vm.dataset])
        running = ctl.is_running(vm.name)
        report = _report(vm, plan, running, kept_name(vm, now) if opts.keep_newer else None)
        if opts.dry_run:
            return report
        _refuse_unagreed(vm, plan, running, opts)
        return {**report, **_run(ctx, ctl, vm, plan, running, opts, lock, now)}
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def _report(vm: VmInfo, plan: RollbackPlan, running: bool, kept: str | None) -> dict[str, Any]:
    return {"vm": vm.name, "dataset": vm.dataset, "snapshot": plan.target.full,
            "destroys": [s.name for s in plan.destroyed], "bases": [s.name for s in plan.bases],
            "running": running, "kept_as": kept}


def _refuse_unagreed(vm: VmInfo, plan: RollbackPlan, running: bool, opts: RollbackOptions) -> None:
    destroys = tuple(s.name for s in plan.destroyed)
    if opts.expect_destroyed is not None and tuple(opts.expect_destroyed) != destroys:
        raise RollbackRefused(f"the snapshots a rollback of {vm.name} destroys changed since they were shown "
                              f"(now: {', '.join(destroys) or 'none'}): nothing was changed; look again")
    if plan.bases and not opts.destroy_base:
        raise RollbackRefused(
            f"rolling {vm.name} back to {plan.target.name} destroys the replication base "
            f"{', '.join(s.name for s in plan.bases)}: the next replication then reports the copy diverged until "
            f"the copy is rolled back to {plan.target.name} or an older common snapshot (or resent). Nothing was "
            "changed; give --destroy-base to go ahead")
    if running and not opts.force_stop:
        raise RollbackRefused(f"VM {vm.name} is running: stop it first, or give --force-stop. Nothing was changed")


def _run(ctx: NodeContext, ctl: VmControl, vm: VmInfo, plan: RollbackPlan, running: bool,
         opts: RollbackOptions, lock: DatasetLock, now: datetime) -> dict[str, Any]:
    done: dict[str, Any] = {"stopped": False, "started": False, "kept_as": None}
    try:
        if running:
            stop_confirmed(ctl, vm.name, ctx.settings.vm_stop_timeout_seconds)
            done["stopped"] = True
        if opts.keep_newer:
            done["kept_as"] = _keep_current_state(ctx, vm, now, lock)
        lock.check()
        _release_bases(ctx, plan)
        ctx.shell.run(cmd.rollback(plan.target.full, ctx.zfs))
        done["rolled_back"] = True
        done["deferred_prunes"] = run_deferred_prunes(ctx, vm.dataset, lock)
    finally:
        if opts.force_start:  # after a failure too: an error must never leave the VM down
            ctl.start(vm.name)
            done["started"] = True
    return done


def _release_bases(ctx: NodeContext, plan: RollbackPlan) -> None:
    """The user agreed to destroy these replication bases (destroy_base): our holds on them go first."""
    for snap in plan.bases:
        for target in ctx.settings.targets:
            ctx.shell.run(cmd.release(ops.hold_tag(target.name), snap.full, ctx.zfs), check=False)


def _keep_current_state(ctx: NodeContext, vm: VmInfo, now: datetime, lock: DatasetLock) -> str:
    """Copy what the VM has now (a fresh snapshot of it) into a new VM dataset; returns its name."""
    existing = {s.name for s in ops.list_snapshots(ctx.shell, [vm.dataset], ctx.caps, ctx.zfs)[vm.dataset]}
    short = make_snapshot_name("custom", now, existing)
    [full] = ops.take_snapshots(ctx.shell, [vm.dataset], short, ctx.caps, ctx.zfs)
    record_snapshots(ctx, [full], now)
    kept = kept_name(vm, now)
    lock.check()
    run_pipeline(Stage(ctx.shell.process_argv(cmd.send(full, zfs=ctx.zfs)), "local"),
                 Stage(ctx.shell.process_argv(cmd.receive(kept, zfs=ctx.zfs)), "local"))
    return kept

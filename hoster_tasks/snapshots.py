"""Taking, listing, pruning and destroying snapshots on this node (the logic behind hoster.snapshot.*)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.errors import Busy, DatasetBusy, InvalidName, Permanent, SnapshotHeld
from hoster_tasks.locks import DatasetLock, LockSpec
from hoster_tasks.names import make_snapshot_name, validate_snapshot, validate_stype
from hoster_tasks.policy.retention import check_keep, plan_retention
from hoster_tasks.settings import Settings
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.parse import Snapshot
from hoster_tasks.zfs.probe import Capabilities
from hoster_tasks.zfs.shell import Shell


@dataclass(frozen=True)
class NodeContext:
    settings: Settings
    shell: Shell
    caps: Capabilities
    redis: redis.Redis

    @property
    def zfs(self) -> str:
        return self.settings.zfs_command

    def lock(self, dataset: str, wait: float | None = None, token: str | None = None) -> DatasetLock:
        spec = LockSpec(
            self.settings.node_name,
            dataset,
            lease=self.settings.lock_lease_seconds,
            wait=self.settings.lock_attempt_seconds if wait is None else wait,
        )
        return DatasetLock(self.redis, spec, token=token) if token else DatasetLock(self.redis, spec)


def replication_bases(ctx: NodeContext, datasets: Sequence[str]) -> dict[str, frozenset[int]]:
    """GUIDs recorded as the newest common snapshot with each configured target: never pruned."""
    if not ctx.settings.targets or not datasets:
        return {ds: frozenset() for ds in datasets}
    props = [ops.base_property(t.name) for t in ctx.settings.targets]
    found = ops.get_properties(ctx.shell, datasets, props, zfs=ctx.zfs)
    return {
        ds: frozenset(int(v) for v in found.get(ds, {}).values() if v.isdigit())
        for ds in datasets
    }


def _lock_all(ctx: NodeContext, stack: ExitStack, datasets: Sequence[str]) -> list[str]:
    """Lock datasets in sorted order within one short shared wait (one attempt); return the busy ones."""
    deadline = time.monotonic() + ctx.settings.lock_attempt_seconds
    busy = []
    for ds in sorted(datasets):
        try:
            stack.enter_context(ctx.lock(ds, wait=max(deadline - time.monotonic(), 0.1)))
        except Busy:
            busy.append(ds)
    return busy


def prune(
    ctx: NodeContext, snaps: dict[str, list[Snapshot]], stype: str, keep: int, bases: dict[str, frozenset[int]]
) -> tuple[list[str], list[str]]:
    """Destroy the excess of `stype` per dataset; held/cloned ones that zfs refuses are spared, not fatal."""
    destroyed: list[str] = []
    spared: list[str] = []
    for ds, dataset_snaps in snaps.items():
        plan = plan_retention(dataset_snaps, stype, keep, bases.get(ds, frozenset()))
        spared += [f"{s.full} ({why})" for s, why in plan.spared]
        for snap in plan.destroy:
            try:
                ops.destroy_snapshot(ctx.shell, snap.full, ctx.zfs)
                destroyed.append(snap.full)
            except (SnapshotHeld, DatasetBusy) as exc:
                spared.append(f"{snap.full} ({exc.stderr})")
    return destroyed, spared


def take(
    ctx: NodeContext, datasets: Sequence[str], stype: str, keep: int | None, now: datetime
) -> dict[str, Any]:
    """Snapshot the datasets (atomically where the host can) and apply retention for `stype`."""
    validate_stype(stype)
    if keep is not None:
        check_keep(keep)
    with ExitStack() as stack:
        busy = _lock_all(ctx, stack, datasets)
        locked = [ds for ds in datasets if ds not in busy]
        taken: list[str] = []
        destroyed: list[str] = []
        spared: list[str] = []
        if locked:
            before = ops.list_snapshots(ctx.shell, locked, ctx.caps, ctx.zfs)
            existing = {s.name for snaps in before.values() for s in snaps}
            short = make_snapshot_name(stype, now, existing)
            taken = ops.take_snapshots(ctx.shell, locked, short, ctx.caps, ctx.zfs)
            record_snapshots(ctx, taken, now)
            if keep is not None:
                after = ops.list_snapshots(ctx.shell, locked, ctx.caps, ctx.zfs)
                destroyed, spared = prune(ctx, after, stype, keep, replication_bases(ctx, locked))
    if busy:
        raise Busy(f"busy: another job holds the lock of {', '.join(busy)}", busy, taken)
    return {"taken": taken, "destroyed": destroyed, "spared": spared}


def record_snapshots(ctx: NodeContext, taken: Sequence[str], now: datetime) -> None:
    pipe = ctx.redis.pipeline()
    for full in taken:
        ds, _ = full.split("@")
        pipe.hset(
            keys.dataset_state(ctx.settings.node_name, ds),
            mapping={"last_snapshot": full, "last_snapshot_time": str(now.timestamp())},
        )
    pipe.execute()


def describe(snaps: dict[str, list[Snapshot]], vm_of_dataset: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for ds, dataset_snaps in snaps.items():
        for s in dataset_snaps:
            rows.append(
                {"vm": vm_of_dataset.get(ds, ds), "snapshot": s.full, "used": s.used, "guid": str(s.guid),
                 "createtxg": s.createtxg, "creation": s.creation, "held": s.userrefs > 0}
            )
    return rows


def destroy_one(ctx: NodeContext, full: str, datasets: Sequence[str]) -> dict[str, Any]:
    """Destroy one snapshot the user named; never a replication base (that would force a full resend)."""
    ds, _ = validate_snapshot(full)
    if ds not in datasets:
        raise InvalidName(f"{full}: not a snapshot of a VM dataset on this node")
    with ctx.lock(ds):
        snaps = ops.list_snapshots(ctx.shell, [ds], ctx.caps, ctx.zfs)[ds]
        match = [s for s in snaps if s.full == full]
        if not match:
            return {"destroyed": None, "note": f"{full} does not exist (already destroyed?)"}
        if match[0].guid in replication_bases(ctx, [ds])[ds]:
            raise Permanent(f"{full} is the replication base with a target: destroying it would force a full resend")
        ops.destroy_snapshot(ctx.shell, full, ctx.zfs)
    return {"destroyed": full}

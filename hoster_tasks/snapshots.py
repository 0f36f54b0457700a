"""Taking, listing, pruning and destroying snapshots on this node (the logic behind hoster.snapshot.*).

Taking a snapshot needs no lock: ZFS snapshots a dataset that is being sent safely, and a snapshot the
schedule should have taken must never be skipped because a replication runs for hours. Destroying does
need the dataset's lock (a send may be reading the snapshot): pruning a dataset that is replicating is
deferred, and the replication runs it when it has recorded its base (`run_deferred_prunes`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.errors import Busy, DatasetBusy, InvalidName, Permanent, SnapshotExists, SnapshotHeld
from hoster_tasks.locks import DatasetLock, LockSpec, join_takers, leave_takers
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

    def lock(self, dataset: str, wait: float | None = None, kind: str = "dataset") -> DatasetLock:
        spec = LockSpec(
            self.settings.node_name,
            dataset,
            lease=self.settings.lock_lease_seconds,
            wait=self.settings.lock_attempt_seconds if wait is None else wait,
            kind=kind,
        )
        return DatasetLock(self.redis, spec)


def replication_bases(ctx: NodeContext, datasets: Sequence[str]) -> dict[str, frozenset[int]]:
    """GUIDs recorded as the newest common snapshot with each configured target, or as being sent there:
    never pruned."""
    if not ctx.settings.targets or not datasets:
        return {ds: frozenset() for ds in datasets}
    props = [p for t in ctx.settings.targets for p in (ops.base_property(t.name), ops.sending_property(t.name))]
    found = ops.get_properties(ctx.shell, datasets, props, zfs=ctx.zfs)
    return {
        ds: frozenset(int(v) for v in found.get(ds, {}).values() if v.isdigit())
        for ds in datasets
    }


PRUNE_LOCK_WAIT = 0.2  # pruning does not wait for a replication: it is deferred to the replication's end
NAME_ATTEMPTS = 5  # same-second snapshots of concurrent jobs: the next free name is tried


def _lock_free(
    ctx: NodeContext, stack: ExitStack, datasets: Sequence[str], kind: str = "dataset", wait: float = PRUNE_LOCK_WAIT
) -> dict[str, DatasetLock]:
    """Lock whichever of the datasets are free within `wait` (sorted order); the busy ones are left out."""
    deadline = time.monotonic() + wait
    locks = {}
    for ds in sorted(datasets):
        try:
            locks[ds] = stack.enter_context(ctx.lock(ds, wait=max(deadline - time.monotonic(), 0.05), kind=kind))
        except Busy:
            continue
    return locks


def _join_takers(ctx: NodeContext, stack: ExitStack, datasets: Sequence[str]) -> list[str]:
    """The datasets no rollback holds, registered as being snapshotted until `stack` closes (locks.py)."""
    node, lease = ctx.settings.node_name, ctx.settings.lock_lease_seconds
    deadline = time.monotonic() + ctx.settings.lock_attempt_seconds
    free: list[str] = []
    pending = list(datasets)
    while pending:
        for ds in list(pending):
            member = join_takers(ctx.redis, node, ds, lease)
            if member is not None:
                stack.callback(leave_takers, ctx.redis, node, ds, member)
                free.append(ds)
                pending.remove(ds)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return free


def prune(
    ctx: NodeContext, snaps: dict[str, list[Snapshot]], stype: str, keep: int, bases: dict[str, frozenset[int]],
    locks: dict[str, DatasetLock],
) -> tuple[list[str], list[str]]:
    """Destroy the excess of `stype` per dataset, each destroy under that dataset's lock (checked first);
    held/cloned ones that zfs refuses are spared, not fatal."""
    destroyed: list[str] = []
    spared: list[str] = []
    for ds, dataset_snaps in snaps.items():
        plan = plan_retention(dataset_snaps, stype, keep, bases.get(ds, frozenset()))
        spared += [f"{s.full} ({why})" for s, why in plan.spared]
        for snap in plan.destroy:
            locks[ds].check()
            try:
                ops.destroy_snapshot(ctx.shell, snap.full, ctx.zfs)
                destroyed.append(snap.full)
            except (SnapshotHeld, DatasetBusy) as exc:
                spared.append(f"{snap.full} ({exc.stderr})")
    return destroyed, spared


def _snapshot_slot(ctx: NodeContext, datasets: Sequence[str], stype: str, slot: int) -> list[str]:
    """At most one snapshot per (dataset, type, beat slot), however many fan-outs of the slot arrive: it is
    named after the slot's tick, so ZFS itself refuses a second one. No Redis marker: ZFS is the record,
    it cannot outlive a failed snapshot, and it survives a Redis failover. Returns what this call took."""
    short = make_snapshot_name(stype, datetime.fromtimestamp(slot, UTC))
    for attempt in range(NAME_ATTEMPTS):
        listed = ops.list_snapshots(ctx.shell, datasets, ctx.caps, ctx.zfs)
        todo = [ds for ds in datasets if all(s.name != short for s in listed.get(ds, []))]
        if not todo:
            return []
        try:
            return ops.take_snapshots(ctx.shell, todo, short, ctx.caps, ctx.zfs)
        except SnapshotExists:  # a concurrent job of the same slot took some: snapshot the rest
            if attempt == NAME_ATTEMPTS - 1:
                raise
    return []


def _snapshot_now(
    ctx: NodeContext, datasets: Sequence[str], stype: str, now: datetime, slot: int | None = None
) -> list[str]:
    if slot is not None:
        return _snapshot_slot(ctx, datasets, stype, slot)
    existing = {s.name for snaps in ops.list_snapshots(ctx.shell, datasets, ctx.caps, ctx.zfs).values()
                for s in snaps}
    for attempt in range(NAME_ATTEMPTS):
        short = make_snapshot_name(stype, now, existing)
        try:
            return ops.take_snapshots(ctx.shell, datasets, short, ctx.caps, ctx.zfs)
        except SnapshotExists:  # another job took this name in the same second
            if attempt == NAME_ATTEMPTS - 1:
                raise
            existing.add(short)
    return []


def take(
    ctx: NodeContext, datasets: Sequence[str], stype: str, keep: int | None, now: datetime,
    slot: int | None = None,
) -> dict[str, Any]:
    """Snapshot the datasets at once (atomically where the host can), then apply retention for `stype`
    where the dataset is free; a replicating dataset's pruning is deferred (reported in `deferred`)."""
    validate_stype(stype)
    if keep is not None:
        check_keep(keep)
    with ExitStack() as stack:  # snapshot jobs exclude only a rollback, never each other
        free = _join_takers(ctx, stack, datasets)
        taken = _snapshot_now(ctx, sorted(free), stype, now, slot) if free else []
    record_snapshots(ctx, taken, now)
    rolling_back = [ds for ds in datasets if ds not in free]
    destroyed: list[str] = []
    spared: list[str] = []
    deferred: list[str] = []
    if keep is not None and datasets:
        with ExitStack() as stack:
            locks = _lock_free(ctx, stack, sorted(free))
            deferred = [ds for ds in sorted(free) if ds not in locks]
            defer_prune(ctx, deferred, stype, keep)
            if locks:
                now_free = sorted(locks)
                after = ops.list_snapshots(ctx.shell, now_free, ctx.caps, ctx.zfs)
                destroyed, spared = prune(ctx, after, stype, keep, replication_bases(ctx, now_free), locks)
    if rolling_back:  # the task retries these alone, up to lock_wait_seconds
        raise Busy(f"busy: a rollback holds {', '.join(rolling_back)}", rolling_back, taken)
    return {"taken": taken, "destroyed": destroyed, "spared": spared, "deferred": deferred}


def defer_prune(ctx: NodeContext, datasets: Sequence[str], stype: str, keep: int) -> None:
    pipe = ctx.redis.pipeline()
    for ds in datasets:
        key = keys.deferred_prunes(ctx.settings.node_name, ds)
        pipe.hset(key, stype, str(keep))
        pipe.expire(key, keys.DEFERRED_PRUNE_TTL_SECONDS)
    pipe.execute()


def run_deferred_prunes(ctx: NodeContext, dataset: str, lock: DatasetLock) -> dict[str, list[str]]:
    """Retention that snapshot jobs deferred while `dataset` was replicating; run under its lock, after the
    replication recorded its base (so the base is never among what is pruned)."""
    key = keys.deferred_prunes(ctx.settings.node_name, dataset)
    pending = {k.decode(): int(v) for k, v in ctx.redis.hgetall(key).items()}  # type: ignore[union-attr]
    destroyed: list[str] = []
    spared: list[str] = []
    for stype, keep in sorted(pending.items()):
        snaps = ops.list_snapshots(ctx.shell, [dataset], ctx.caps, ctx.zfs)
        d, s = prune(ctx, snaps, stype, keep, replication_bases(ctx, [dataset]), {dataset: lock})
        destroyed += d
        spared += s
        ctx.redis.hdel(key, stype)
    return {"destroyed": destroyed, "spared": spared}


def record_snapshots(ctx: NodeContext, taken: Sequence[str], now: datetime) -> None:
    """Each dataset's last snapshot, for `status` and metrics (with its TTL and index: observability.state)."""
    from hoster_tasks.observability import state

    pipe = ctx.redis.pipeline()
    for full in taken:
        ds, _ = full.split("@")
        fields = {"last_snapshot": full, "last_snapshot_time": str(now.timestamp())}
        state.record_dataset(pipe, ctx.settings.node_name, ds, fields, now.timestamp())
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
    """Destroy one snapshot the user named; never a replication base (that would force a full resend).
    `datasets`: the VM datasets this node owns (a backup copy is read-only)."""
    ds, _ = validate_snapshot(full)
    if ds not in datasets:
        raise InvalidName(f"{full}: not a snapshot of a VM this node owns")
    with ctx.lock(ds) as lock:
        snaps = ops.list_snapshots(ctx.shell, [ds], ctx.caps, ctx.zfs)[ds]
        match = [s for s in snaps if s.full == full]
        if not match:
            return {"destroyed": None, "note": f"{full} does not exist (already destroyed?)"}
        if match[0].guid in replication_bases(ctx, [ds])[ds]:
            raise Permanent(f"{full} is the replication base with a target: destroying it would force a full resend")
        lock.check()
        ops.destroy_snapshot(ctx.shell, full, ctx.zfs)
    return {"destroyed": full}

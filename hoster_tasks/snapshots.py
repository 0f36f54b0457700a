"""Taking, listing, pruning and destroying snapshots on this node (the logic behind hoster.snapshot.*).

Taking a snapshot needs no lock: ZFS snapshots a dataset that is being sent safely, and a snapshot the
schedule should have taken must never be skipped because a replication runs for hours. Destroying does
need the dataset's lock (a send may be reading the snapshot): pruning a dataset that is replicating is
deferred, and the replication runs it when it has recorded its base (`run_deferred_prunes`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.at_once import at_once
from hoster_tasks.errors import Busy, InvalidName, Permanent, SnapshotExists
from hoster_tasks.locks import DatasetLock, LockGroup, LockSpec, join_takers_many, leave_takers_many
from hoster_tasks.names import make_snapshot_name, validate_snapshot, validate_stype
from hoster_tasks.policy.retention import check_keep, plan_retention
from hoster_tasks.settings import Settings
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.parse import Snapshot, snapshots_from_get
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
    """Lock whichever of the datasets are free within `wait`; the busy ones are left out. All in one group:
    one round trip to take them, one heartbeat for all, one to release them (locks.LockGroup)."""
    group = stack.enter_context(LockGroup(ctx.redis, ctx.settings.node_name, ctx.settings.lock_lease_seconds, kind))
    return group.take(sorted(datasets), wait)


def _join_takers(ctx: NodeContext, stack: ExitStack, datasets: Sequence[str]) -> list[str]:
    """The datasets no rollback holds, registered as being snapshotted until `stack` closes (locks.py), all
    in one round trip; those a rollback holds are tried again every 0.1 s up to lock_attempt_seconds."""
    node, lease = ctx.settings.node_name, ctx.settings.lock_lease_seconds
    deadline = time.monotonic() + ctx.settings.lock_attempt_seconds
    free: list[str] = []
    pending = list(datasets)
    while pending:
        member, joined = join_takers_many(ctx.redis, node, pending, lease)
        if joined:
            stack.callback(leave_takers_many, ctx.redis, node, joined, member)
            free += joined
            pending = [ds for ds in pending if ds not in set(joined)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return free


PRUNE_PARALLEL = 8  # datasets pruned at once: separate `zfs destroy` calls run in parallel on both ZFSes


def prune(
    ctx: NodeContext, snaps: dict[str, list[Snapshot]], stype: str, keep: int, bases: dict[str, frozenset[int]],
    locks: dict[str, DatasetLock],
) -> tuple[list[str], list[str]]:
    """Destroy the excess of `stype` per dataset, each destroy under that dataset's lock (checked first);
    held/cloned ones that zfs refuses are spared, not fatal. One call per dataset where the ZFS takes a list
    (`destroy ds@a,b`), one per snapshot where not; up to PRUNE_PARALLEL datasets at once."""
    spared: list[str] = []
    work: list[tuple[str, list[str]]] = []
    for ds, dataset_snaps in snaps.items():
        plan = plan_retention(dataset_snaps, stype, keep, bases.get(ds, frozenset()))
        spared += [f"{s.full} ({why})" for s, why in plan.spared]
        if plan.destroy:
            work.append((ds, [s.full for s in plan.destroy]))

    def one(item: tuple[str, list[str]]) -> tuple[list[str], list[str]]:
        ds, fulls = item
        return ops.destroy_snapshots(ctx.shell, fulls, ctx.caps, ctx.zfs, check=locks[ds].check)

    if len(work) > 1:
        with ThreadPoolExecutor(min(PRUNE_PARALLEL, len(work)), thread_name_prefix="prune") as pool:
            results = list(pool.map(one, work))
    else:
        results = [one(item) for item in work]
    destroyed = [full for d, _ in results for full in d]
    return destroyed, spared + [why for _, s in results for why in s]


@dataclass(frozen=True)
class Listing:
    """What one batched `zfs get -r` before a snapshot job says: each dataset's snapshots and replication
    bases, and (where listed by root) every filesystem under each VM root."""

    snaps: dict[str, list[Snapshot]]
    bases: dict[str, frozenset[int]]
    under: dict[str, set[str]]


def _root_of(ds: str) -> str:
    return ds.rsplit("/", 1)[0]


# What retention reads of a snapshot (order, identity, holds): half the listing of every property `list` shows.
RETENTION_PROPS = ("guid", "createtxg", "userrefs")


def list_for_take(ctx: NodeContext, datasets: Sequence[str]) -> Listing:
    """Snapshots and bases of `datasets` in one call. Where `zfs snapshot -r` may be the atomic snapshot
    (no multi-name snapshot, several datasets) the VM roots are listed whole, to see what else lives there."""
    base_props = tuple(p for t in ctx.settings.targets for p in (ops.base_property(t.name),
                                                                  ops.sending_property(t.name)))
    clones = ("clones",) if ctx.caps.clones_property else ()
    by_root = not ctx.caps.multi_snapshot and len(datasets) > 1
    roots = sorted({_root_of(ds) for ds in datasets}) if by_root else []
    found = ops.get_properties(ctx.shell, roots or datasets, RETENTION_PROPS + clones + base_props,
                               recursive=True, zfs=ctx.zfs)
    snaps = snapshots_from_get(found)
    bases = {ds: frozenset(int(v) for k, v in found.get(ds, {}).items() if k in base_props and v.isdigit())
             for ds in datasets}
    under = {r: {n for n in found if "@" not in n and n.startswith(r + "/")} for r in roots}
    return Listing({ds: snaps.get(ds, []) for ds in datasets}, bases, under)


@dataclass(frozen=True)
class Taken:
    """What a snapshot call took. After a recursive snapshot, `checks` remain: each drops what the call took
    of datasets that appeared under its root in between, and returns what it did not take (a VM removed in
    between). They run beside the prune (`confirmed`), which does not depend on them."""

    names: list[str]
    checks: tuple[Callable[[], list[str]], ...] = ()

    def confirmed(self) -> list[str]:
        gone = {n for check in self.checks for n in check()}
        return [n for n in self.names if n not in gone]


def _take_atomic(ctx: NodeContext, datasets: Sequence[str], short: str, listing: Listing) -> Taken:
    """One multi-name call where the host has it; else `zfs snapshot -r` for each root whose descendants are
    exactly the datasets asked for (never a dataset the caller did not name: a backup copy, a VM being
    rolled back or a VM's own child rules it out), and one call per dataset for the rest."""
    if ctx.caps.multi_snapshot or len(datasets) < 2:
        return Taken(ops.take_snapshots(ctx.shell, datasets, short, ctx.caps, ctx.zfs))
    groups: dict[str, list[str]] = {}
    for ds in datasets:
        groups.setdefault(_root_of(ds), []).append(ds)
    taken: list[str] = []
    checks: list[Callable[[], list[str]]] = []
    rest: list[str] = []
    try:
        for root, members in groups.items():
            if len(members) > 1 and listing.under.get(root) == set(members):
                ops.snapshot_tree(ctx.shell, root, short, ctx.zfs)
                taken += [f"{ds}@{short}" for ds in members]
                checks.append(partial(ops.drop_strays, ctx.shell, root, members, short, ctx.zfs))
            else:
                rest += members
        if rest:
            taken += ops.take_snapshots(ctx.shell, rest, short, ctx.caps, ctx.zfs)
    except BaseException:
        for check in checks:  # a recursive snapshot already taken never leaves a stray behind
            check()
        raise
    return Taken(taken, tuple(checks))


def _snapshot_slot(ctx: NodeContext, datasets: Sequence[str], stype: str, slot: int, listing: Listing) -> Taken:
    """At most one snapshot per (dataset, type, beat slot), however many fan-outs of the slot arrive: it is
    named after the slot's tick, so ZFS itself refuses a second one. No Redis marker: ZFS is the record,
    it cannot outlive a failed snapshot, and it survives a Redis failover. Returns what this call took."""
    short = make_snapshot_name(stype, datetime.fromtimestamp(slot, UTC))
    listed = listing.snaps
    for attempt in range(NAME_ATTEMPTS):
        todo = [ds for ds in datasets if all(s.name != short for s in listed.get(ds, []))]
        if not todo:
            return Taken([])
        try:
            return _take_atomic(ctx, todo, short, listing)
        except SnapshotExists:  # a concurrent job of the same slot took some: snapshot the rest
            if attempt == NAME_ATTEMPTS - 1:
                raise
            listed = ops.list_snapshots(ctx.shell, datasets, ctx.caps, ctx.zfs)
    return Taken([])


def _snapshot_now(
    ctx: NodeContext, datasets: Sequence[str], stype: str, now: datetime, listing: Listing, slot: int | None = None
) -> Taken:
    if slot is not None:
        return _snapshot_slot(ctx, datasets, stype, slot, listing)
    existing = {s.name for snaps in listing.snaps.values() for s in snaps}
    for attempt in range(NAME_ATTEMPTS):
        short = make_snapshot_name(stype, now, existing)
        try:
            return _take_atomic(ctx, datasets, short, listing)
        except SnapshotExists:  # another job took this name in the same second
            if attempt == NAME_ATTEMPTS - 1:
                raise
            existing.add(short)
    return Taken([])


def _with_taken(snaps: dict[str, list[Snapshot]], taken: Sequence[str]) -> dict[str, list[Snapshot]]:
    """The listing made before the snapshot, with what this job took added as each dataset's newest."""
    out = {ds: list(v) for ds, v in snaps.items()}
    for full in taken:
        ds, name = full.split("@", 1)
        if ds in out:
            newest = max((s.createtxg for s in out[ds]), default=0)
            out[ds].append(Snapshot(dataset=ds, name=name, guid=0, createtxg=newest + 1))
    return out


def take(
    ctx: NodeContext, datasets: Sequence[str], stype: str, keep: int | None, now: datetime,
    slot: int | None = None,
) -> dict[str, Any]:
    """Snapshot the datasets at once (atomically where the host can), then apply retention for `stype`
    where the dataset is free; a replicating dataset's pruning is deferred (reported in `deferred`).

    One listing serves both: it is made after the free datasets' locks are taken (so the bases and holds it
    shows cannot change before the prune, which only a lock holder changes), and what this job took is
    added to it as each dataset's newest snapshot, which retention keeps (keep >= 1). A snapshot taken by a
    concurrent job without `keep` is then not seen: it is pruned by a later run, never instead of another."""
    validate_stype(stype)
    if keep is not None:
        check_keep(keep)
    with ExitStack() as stack:  # snapshot jobs exclude only a rollback, never each other
        free = sorted(_join_takers(ctx, stack, datasets))
        locks = _lock_free(ctx, stack, free) if keep is not None else {}
        listing = list_for_take(ctx, free) if free else Listing({}, {}, {})
        started = _snapshot_now(ctx, free, stype, now, listing, slot) if free else Taken([])

        def retention() -> tuple[list[str], list[str], list[str]]:
            if keep is None:
                return [], [], []
            deferred = [ds for ds in free if ds not in locks]
            defer_prune(ctx, deferred, stype, keep)
            if not locks:
                return [], [], deferred
            after = _with_taken({ds: listing.snaps[ds] for ds in sorted(locks)}, started.names)
            return (*prune(ctx, after, stype, keep, listing.bases, locks), deferred)

        def record() -> list[str]:  # recorded even when the prune fails: the snapshots exist
            confirmed = started.confirmed()
            record_snapshots(ctx, confirmed, now)
            return confirmed

        # the recursive snapshot's stray check and the prune touch different snapshots: both at once
        taken, (destroyed, spared, deferred) = at_once(record, retention)
    rolling_back = [ds for ds in datasets if ds not in free]
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

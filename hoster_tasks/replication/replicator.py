"""One replication run from this node to one endpoint: list both sides once, plan, send, finish.

Safety rules live here: a backup copy is never a source; a target owned by another node is never written;
a diverged target is refused untouched; the new common base is recorded (and held where ZFS can) before
anything is pruned, and is never pruned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from hoster_tasks import failed, keys
from hoster_tasks.at_once import at_once
from hoster_tasks.errors import (
    Diverged,
    EncryptedSendRefused,
    Permanent,
    ReceiveInProgress,
    SnapshotExists,
    SnapshotHeld,
    ZfsError,
    zfs_error,
)
from hoster_tasks.locks import DatasetLock, LockSpec
from hoster_tasks.names import parse_snapshot_name
from hoster_tasks.observability import state
from hoster_tasks.observability.errorfile import error_name, update_errors
from hoster_tasks.observability.progress import TransferProgress
from hoster_tasks.policy.planner import Action, Plan, Step, StepKind, plan_replication, target_prune
from hoster_tasks.policy.retention import plan_retention
from hoster_tasks.replication.pipeline import PipelineResult, Stage, run_pipeline
from hoster_tasks.replication.receiving import receive_in_progress
from hoster_tasks.replication.watchdog import LeaseWatch
from hoster_tasks.settings import Endpoint
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.parse import Snapshot, bookmarks_from_get, parse_get, parse_send_size, snapshots_from_get
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import Result, Shell, run_many, shell_for

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Sides:
    """Both sides' state for a set of datasets, from one listing per host."""

    source: dict[str, list[Snapshot]]
    source_props: dict[str, dict[str, str]]
    target: dict[str, list[Snapshot] | None]  # None: the target dataset does not exist
    target_props: dict[str, dict[str, str]]
    bookmarks: dict[str, list[Snapshot]] = field(default_factory=dict)  # the source's (OpenZFS)


class Replicator:
    def __init__(
        self,
        ctx: NodeContext,
        endpoint: Endpoint,
        speed_limit: float | None = None,
        progress: ProgressFn | None = None,
        target_shell: Shell | None = None,
        caps_cache: dict[str, Capabilities] | None = None,
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.speed_limit = speed_limit
        self.progress = progress
        self.target_shell: Shell = target_shell or shell_for(endpoint)
        self.cancel = threading.Event()
        self._caps_cache = caps_cache
        self.active_locks: list[DatasetLock] = []  # the locks of the dataset being worked on (see locks())
        self.spared_on_target: list[str] = []  # held or busy snapshots the last target prune left alone
        self.on_diverged: str | None = None  # "discard" | "keep": the user's choice for a diverged copy
        self.settled: dict[str, Any] = {}  # what _settle_divergence did
        self.error_name: str | None = None  # the ERROR_ file a failure goes to; None: `to_<endpoint name>`

    @cached_property
    def target_caps(self) -> Capabilities:
        """Probed on first use; with a cache (a worker's), once per endpoint: a host's ZFS does not change.

        A failed probe raises (ConnectionLost, ProbeFailed) and is cached nowhere, so the next use probes
        again: "nothing supported" is never assumed for a host that did not answer."""
        cache = self._caps_cache
        if cache is not None and self.endpoint.name in cache:
            return cache[self.endpoint.name]
        caps = probe(self.target_shell, self.ctx.zfs)
        if cache is not None:
            cache[self.endpoint.name] = caps
        return caps

    @property
    def tag(self) -> str:
        return ops.hold_tag(self.endpoint.name)

    def close(self) -> None:
        self.target_shell.close()

    # -- locks ---------------------------------------------------------------------------------------
    def locks(self, dataset: str, chain: str | None = None) -> tuple[DatasetLock, DatasetLock]:
        """Source and target dataset locks; either one lost stops this dataset's transfer (and only this
        dataset's: each dataset gets its own cancel event)."""
        s = self.ctx.settings
        self.cancel = threading.Event()
        # a short wait per attempt: a busy dataset fails this attempt as Busy, retried with backoff
        specs = (LockSpec(s.node_name, dataset, s.lock_lease_seconds, s.lock_attempt_seconds),
                 LockSpec(self.endpoint.name, self.endpoint.target_dataset(dataset), s.lock_lease_seconds,
                          s.lock_attempt_seconds))
        src, tgt = (DatasetLock(self.ctx.redis, spec, chain=chain, on_lost=self.cancel.set) for spec in specs)
        self.active_locks = [src, tgt]
        return src, tgt

    def guard(self) -> None:
        """Called before every destructive command: both locks are still ours (value and fence)."""
        for lock in self.active_locks:
            lock.check()

    # -- listing -------------------------------------------------------------------------------------
    def list_sides(self, datasets: Sequence[str], check_receive: bool = False) -> Sides:
        """One listing per side, both at once (the slower side sets the pace). `check_receive`: first refuse
        a dataset a `zfs receive` is running into (`_refuse_receiving`), read in the same round trip."""
        src_props = ops.snapshot_props(self.ctx.caps) + (ops.base_property(self.endpoint.name),)
        if self.ctx.caps.raw_send:
            src_props += ("encryption",)
        targets = [self.endpoint.target_dataset(ds) for ds in datasets]
        raw, (tgt_raw, missing) = at_once(
            lambda: ops.get_properties(self.ctx.shell, datasets, src_props, True, self.ctx.zfs),
            lambda: self._list_target(dict(zip(targets, datasets, strict=True)), check_receive),
        )
        by_dataset = snapshots_from_get(raw)
        source = {ds: by_dataset.get(ds, []) for ds in datasets}
        found = snapshots_from_get(tgt_raw)
        target = {t: (None if t in missing else found.get(t, [])) for t in targets}
        marks = bookmarks_from_get(raw) if self.ctx.caps.bookmarks else {}
        return Sides(source, {ds: raw.get(ds, {}) for ds in datasets}, target,
                     {t: tgt_raw.get(t, {}) for t in targets}, {ds: marks.get(ds, []) for ds in datasets})

    def _list_target(self, targets: dict[str, str], check_receive: bool) -> tuple[dict[str, dict[str, str]], set[str]]:
        """`targets`: {target dataset: its source dataset}."""
        props = ops.snapshot_props(self.target_caps) + (ops.PARENT_PROPERTY,)
        if self.target_caps.resumable:
            props += (ops.RESUME_TOKEN,)
        argv = cmd.get_props(targets, props, recursive=True, zfs=self.ctx.zfs)
        if check_receive:
            ps, result = run_many(self.target_shell, [cmd.process_args(), argv], check=False)
            self._refuse_receiving(ps, targets)
        else:
            result = self.target_shell.run(argv, check=False)
        missing = {t for t in targets if f"'{t}'" in result.stderr and "does not exist" in result.stderr}
        other_errors = [
            line for line in result.stderr.splitlines()
            if line.strip() and not ("does not exist" in line and any(f"'{t}'" in line for t in missing))
        ]
        if result.exit_code != 0 and other_errors:
            raise zfs_error(argv, result.exit_code, "\n".join(other_errors), self.target_shell.host)
        lines = "\n".join(line for line in result.stdout.splitlines() if line.count("\t") == 2)
        return parse_get(lines), missing

    # -- checks and plan -----------------------------------------------------------------------------
    def check_owner(self, dataset: str, sides: Sides) -> None:
        target = self.endpoint.target_dataset(dataset)
        owner = sides.target_props.get(target, {}).get(ops.PARENT_PROPERTY, "-")
        if owner not in ("-", "", self.ctx.settings.node_name):
            raise Permanent(
                f"{self.endpoint.name}:{target} belongs to node {owner!r} (its parent): refusing to replicate "
                f"{self.ctx.settings.node_name}:{dataset} over it"
            )

    def plan(self, dataset: str, sides: Sides) -> Plan:
        self.check_owner(dataset, sides)
        target = self.endpoint.target_dataset(dataset)
        plan = plan_replication(sides.source[dataset], sides.target[target], sides.bookmarks.get(dataset, ()))
        if plan.action is Action.DIVERGED:
            keep = "--keep-diverged (keep the copy as a renamed dataset, then send in full)"
            choices = (f" To go on: --discard-diverged (roll the copy back to {plan.common.name}, destroying what "
                       f"it has newer) or {keep}." if plan.common else f" To go on: {keep}.")
            raise Diverged(f"{self.ctx.settings.node_name}:{dataset} -> {self.endpoint.name}:{target} diverged: "
                           f"{plan.reason}. Nothing was changed on either side.{choices}")
        return plan

    def prepare(self, dataset: str) -> tuple[Sides, Plan, int]:
        """Under the locks: list both sides, check the copy is ours to write, finish an interrupted receive
        (or abort it), then plan from a fresh listing. Returns the bytes resumed."""
        sides = self.list_sides([dataset], check_receive=True)
        self.check_owner(dataset, sides)  # before resume: a foreign copy's partial receive is not ours either
        had_token = self._token(dataset, sides) is not None
        resumed = self.resume(dataset, sides)
        if had_token:  # resumed or aborted: either way the target changed
            sides = self.list_sides([dataset])
        if self.on_diverged is not None:
            sides = self._settle_divergence(dataset, sides)
        return sides, self.plan(dataset, sides), resumed.bytes if resumed else 0

    def _settle_divergence(self, dataset: str, sides: Sides) -> Sides:
        """What the user chose for a copy that went its own way (the way back after a failover):
        "discard" rolls the copy back to the newest common snapshot (destroying what it has newer, listed in
        `self.settled`), "keep" renames it aside so a full send starts over. Returns the sides after it."""
        target = self.endpoint.target_dataset(dataset)
        tsnaps = sides.target.get(target)
        if tsnaps is None:
            return sides
        plan = plan_replication(sides.source[dataset], tsnaps)
        if self.on_diverged == "discard":
            if plan.common is None:
                raise Diverged(f"{self.endpoint.name}:{target} has no snapshot in common with {dataset}: there is "
                               "nothing to roll it back to; use --keep-diverged. Nothing was changed")
            common = next(s for s in tsnaps if s.guid == plan.common.guid)
            self.settled = {"discarded": [s.name for s in tsnaps if s.createtxg > common.createtxg],
                            "rolled_back_to": common.full}
            self.guard()
            for snap in tsnaps:  # our own holds on what the user agreed to discard go first
                if snap.createtxg > common.createtxg and snap.userrefs:
                    self.target_shell.run(cmd.release(self.tag, snap.full, self.ctx.zfs), check=False)
            self.target_shell.run(cmd.rollback(common.full, self.ctx.zfs))
        elif plan.action is Action.DIVERGED:
            kept = f"{target}-diverged-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            self.settled = {"kept_as": kept}
            self.guard()
            self.target_shell.run(cmd.unmount(target, self.ctx.zfs), check=False)  # a mounted one is busy
            self.target_shell.run(cmd.rename(target, kept, self.ctx.zfs))
        else:
            return sides
        return self.list_sides([dataset])

    def _refuse_receiving(self, ps: Result, targets: dict[str, str]) -> None:
        """Busy (retried later), never diverged, while a `zfs receive` into a target runs there: a transfer
        that outlived its worker's lease, or another tool's, whose half-received dataset would look diverged.
        Syncoid checks the same before it starts."""
        if ps.exit_code != 0:
            raise zfs_error(ps.argv, ps.exit_code, ps.stderr, self.target_shell.host)
        for target, dataset in targets.items():
            if receive_in_progress(ps.stdout, target):
                raise ReceiveInProgress(
                    f"target {self.endpoint.name}:{target} has a zfs receive in progress; retrying later", [dataset]
                )

    # -- data path -----------------------------------------------------------------------------------
    def send_step(self, dataset: str, step: Step, sides: Sides) -> PipelineResult:
        target = self.endpoint.target_dataset(dataset)
        opts = cmd.SendOptions(raw=self._raw(dataset, sides))
        base = step.base.full if step.kind is StepKind.INCREMENTAL and step.base else None
        send_argv = cmd.send(step.snapshot.full, base, opts, self.ctx.zfs)
        total = self.estimate(step, opts)
        return self._transfer(dataset, send_argv, self._receive(target, self._resumable()), total)

    def resume(self, dataset: str, sides: Sides) -> PipelineResult | None:
        """Finish an interrupted resumable receive; abort a token whose snapshot is gone."""
        target = self.endpoint.target_dataset(dataset)
        token = self._token(dataset, sides)
        if token is None:
            return None
        send_argv = cmd.send("", None, cmd.SendOptions(resume_token=token), self.ctx.zfs)
        try:
            return self._transfer(dataset, send_argv, self._receive(target, True), None)
        except ZfsError:
            self.guard()
            self.target_shell.run(cmd.receive_abort(target, self.ctx.zfs))
            return None

    def _token(self, dataset: str, sides: Sides) -> str | None:
        token = sides.target_props.get(self.endpoint.target_dataset(dataset), {}).get(ops.RESUME_TOKEN, "-")
        return token if self._resumable() and token not in ("-", "") else None

    def _transfer(self, dataset: str, send_argv: list[str], recv_argv: list[str], total: int | None) -> PipelineResult:
        recorded = TransferProgress(self.ctx.redis, self.ctx.settings.node_name, dataset, self.endpoint.name)

        def report(n: int) -> None:
            recorded.update(n, total)  # bytes remaining, for metrics
            if self.progress is not None:
                self.progress({"dataset": dataset, "target": self.endpoint.name, "bytes": n, "total": total})

        try:
            result = run_pipeline(
                Stage(self.ctx.shell.process_argv(send_argv), "local"),
                Stage(self.target_shell.process_argv(recv_argv), self.endpoint.name),
                speed_limit_mb=self.speed_limit,
                progress=report,
                cancel=self.cancel,
                # the stages die once the locks are gone, even while this worker is frozen and cannot stop them
                lease=LeaseWatch.of(self.ctx.settings.redis_url, self.active_locks),
                stall_seconds=self.endpoint.stall_seconds,
            )
        finally:
            recorded.done()
        if self.progress is not None:  # the final count, which a throttled report may have skipped
            self.progress({"dataset": dataset, "target": self.endpoint.name, "bytes": result.bytes,
                           "total": max(total or 0, result.bytes) or None, "done": True})
        return result

    def _raw(self, dataset: str, sides: Sides) -> bool:
        """True: send raw (`-w`), the dataset stays encrypted on the target. An encrypted dataset that cannot
        go raw (either side lacks `send -w`) is refused, unless the endpoint allows a decrypted copy."""
        if not self.ctx.caps.encryption:
            return False  # a ZFS without native encryption (zfs-fuse) has no encrypted dataset
        enc = sides.source_props.get(dataset, {}).get("encryption")
        if enc is None:  # the listing reads it only where the source has raw send
            found = ops.get_properties(self.ctx.shell, [dataset], ("encryption",), zfs=self.ctx.zfs)
            enc = found.get(dataset, {}).get("encryption", "off")
        if enc in ("off", "-", ""):
            return False
        missing = [side for side, caps in (("this node", self.ctx.caps), (self.endpoint.name, self.target_caps))
                   if not caps.raw_send]
        if not missing:
            return True
        if self.endpoint.send_decrypted:
            return False
        raise EncryptedSendRefused(
            f"{self.ctx.settings.node_name}:{dataset} is encrypted ({enc}) and the ZFS on {' and '.join(missing)} "
            f"has no raw send (zfs send -w): refusing to send it decrypted to {self.endpoint.name}. Nothing was "
            f"sent. Set send_decrypted = true on endpoint {self.endpoint.name!r} to allow a plaintext copy."
        )

    def _receive(self, target: str, resumable: bool) -> list[str]:
        """Where the target can, the copy is marked a read-only backup of this node by the receive itself:
        a copy cut midway, or one a worker died on before `_mark_copy`, is never listed as the backup
        node's own VM (which a heartbeat would publish, and the CLI route this VM's jobs to)."""
        marks = {ops.PARENT_PROPERTY: self.ctx.settings.node_name, "readonly": "on"}
        return cmd.receive(target, resumable, self.ctx.zfs, marks if self.target_caps.receive_props else None)

    def _resumable(self) -> bool:
        return self.ctx.caps.resumable and self.target_caps.resumable

    def estimate(self, step: Step, opts: cmd.SendOptions) -> int | None:
        if self.ctx.caps.send_estimate:
            base = step.base.full if step.base else None
            dry = cmd.SendOptions(raw=opts.raw, dry_run=True)
            out = self.ctx.shell.run(cmd.send(step.snapshot.full, base, dry, self.ctx.zfs), check=False)
            return parse_send_size(out.stdout + out.stderr)
        if step.base is None:
            return step.snapshot.referenced or None
        return max(step.snapshot.referenced - step.base.referenced, 0) + step.snapshot.used or None

    def mark_sending(self, dataset: str, snap: Snapshot) -> None:
        """Before a send: protect what it sends from retention until the base has moved (ops.SENDING_...)."""
        self.guard()
        ops.set_property(self.ctx.shell, dataset, ops.sending_property(self.endpoint.name), str(snap.guid),
                         self.ctx.zfs)

    # -- after a successful transfer -------------------------------------------------------------------
    def protect_base(self, dataset: str, base: Snapshot, sides: Sides) -> Sides:
        """Record `base` as the newest common snapshot, hold it on both sides and mark the copy as ours.

        Runs after every send step, before the step returns: a run that stops after its first link never
        leaves the snapshot it sent prunable (retention reads the recorded base). The two sides work at the
        same time, in two phases: record and hold the new base; then, only once both sides hold it, release
        the old one (so at every moment one common snapshot is held on both), bookmark and mark the copy.
        Returns `sides` as they are now; writes nothing when all of it is already so.
        """
        target = self.endpoint.target_dataset(dataset)
        prop = ops.base_property(self.endpoint.name)
        old_guid = sides.source_props.get(dataset, {}).get(prop, "-")
        moved = old_guid != str(base.guid)
        hold = self._holds() and (moved or self.base_unheld(dataset, sides))
        if moved or hold:
            self.guard()

        def record_and_hold() -> None:
            if moved:
                ops.set_property(self.ctx.shell, dataset, prop, str(base.guid), self.ctx.zfs)
            if hold:
                self._hold(self.ctx.shell, base.full)

        at_once(record_and_hold, lambda: self._hold(self.target_shell, f"{target}@{base.name}") if hold else None)
        old = int(old_guid) if hold and old_guid.isdigit() and int(old_guid) != base.guid else None
        # by each side's own listing: the old base may be gone from the source (a bookmark run)
        old_src, old_tgt = _by_guid(sides.source[dataset], old), _by_guid(sides.target.get(target), old)

        def release_and_bookmark() -> None:
            if old_src is not None:
                self._release(self.ctx.shell, old_src.full)
            self._bookmark_base(dataset, base, sides)  # also when a run died between recording it and this

        def release_and_mark() -> dict[str, str]:
            if old_tgt is not None:
                self._release(self.target_shell, old_tgt.full)
            return self._mark_copy(target, sides)

        _, marked = at_once(release_and_bookmark, release_and_mark)
        src_props = {**sides.source_props, dataset: {**sides.source_props.get(dataset, {}), prop: str(base.guid)}}
        tgt_props = {**sides.target_props, target: {**sides.target_props.get(target, {}), **marked}}
        released = {old} if old is not None else set()
        return _without_holds(replace(sides, source_props=src_props, target_props=tgt_props), target, released)

    def _bookmark_base(self, dataset: str, base: Snapshot, sides: Sides) -> None:
        """Bookmark the base (OpenZFS) unless the listing shows it bookmarked, then drop this target's older
        bookmarks: if the base snapshot is destroyed by hand, the next run still goes incremental from its
        bookmark (planner). One per target; writes nothing when all of it is already so."""
        if not self.ctx.caps.bookmarks:
            return
        prefix = ops.bookmark_prefix(self.endpoint.name)
        ours = [b for b in sides.bookmarks.get(dataset, []) if b.name.startswith(prefix)]
        if not any(b.guid == base.guid for b in ours):
            mark = f"{dataset}#{ops.bookmark_name(self.endpoint.name, base.name)}"
            try:
                self.ctx.shell.run(cmd.bookmark(base.full, mark, self.ctx.zfs))
            except SnapshotExists:
                pass  # a retry of this step made it already
        for old in ours:
            if old.guid != base.guid:
                self.guard()
                self.ctx.shell.run(cmd.destroy_bookmark(old.full, self.ctx.zfs), check=False)

    def _mark_copy(self, target: str, sides: Sides) -> dict[str, str]:
        """First run: mark the copy as a backup of this node, and read-only (see commands.set_readonly)."""
        if sides.target_props.get(target, {}).get(ops.PARENT_PROPERTY, "-") not in ("-", ""):
            return {}
        self.guard()
        ops.set_property(self.target_shell, target, ops.PARENT_PROPERTY, self.ctx.settings.node_name, self.ctx.zfs)
        self.target_shell.run(cmd.set_readonly(target, self.ctx.zfs))
        return {ops.PARENT_PROPERTY: self.ctx.settings.node_name}

    def finish(self, dataset: str, after: Sides) -> dict[str, Any]:
        """Protect the newest common base (already done by each step; this covers a run that sent
        nothing), then prune the target. `after` is a listing made after the last transfer."""
        target = self.endpoint.target_dataset(dataset)
        base = self._base_after(dataset, after)
        after = self.protect_base(dataset, base, after)
        self.guard()
        pruned = self._prune_target(dataset, base, after)
        newest_target = max((s.creation for s in after.target[target] or []), default=0)
        return {"base": base.full, "pruned_on_target": pruned, "spared_on_target": self.spared_on_target,
                "target_newest_creation": newest_target}

    def base_unheld(self, dataset: str, sides: Sides) -> bool:
        """True where holds exist but the recorded base lacks ours on either side (a run that died midway)."""
        if not self._holds():
            return False
        recorded = sides.source_props.get(dataset, {}).get(ops.base_property(self.endpoint.name), "-")
        both = (sides.source[dataset], sides.target.get(self.endpoint.target_dataset(dataset)) or [])
        return any(s.guid == int(recorded) and s.userrefs == 0 for snaps in both for s in snaps) \
            if recorded.isdigit() else False

    def _base_after(self, dataset: str, after: Sides) -> Snapshot:
        target_guids = {s.guid for s in after.target[self.endpoint.target_dataset(dataset)] or []}
        common = [s for s in after.source[dataset] if s.guid in target_guids]
        if not common:
            raise Diverged(f"after the transfer {dataset} has no snapshot in common with {self.endpoint.name}")
        return common[-1]

    def _holds(self) -> bool:
        return self.ctx.caps.holds and self.target_caps.holds

    def _hold(self, shell: Shell, full: str) -> None:
        try:
            shell.run(cmd.hold(self.tag, full, self.ctx.zfs))
        except (SnapshotExists, SnapshotHeld):
            pass  # already held by us: holds are idempotent here

    def _release(self, shell: Shell, full: str) -> None:
        shell.run(cmd.release(self.tag, full, self.ctx.zfs), check=False)

    def _prune_target(self, dataset: str, base: Snapshot, after: Sides) -> list[str]:
        target = self.endpoint.target_dataset(dataset)
        tsnaps = after.target[target] or []
        if self.endpoint.keep:
            doomed = []
            for stype, keep in self.endpoint.keep.items():
                doomed += list(plan_retention(tsnaps, stype, keep, frozenset({base.guid})).destroy)
            kept_types = set(self.endpoint.keep)
            doomed += [s for s in target_prune(after.source[dataset], tsnaps, base.guid)
                       if (n := parse_snapshot_name(s.name)) is not None and n.stype not in kept_types]
        else:
            doomed = target_prune(after.source[dataset], tsnaps, base.guid)
        fulls = list(dict.fromkeys(s.full for s in sorted(doomed, key=lambda s: s.createtxg) if s.guid != base.guid))
        # batched where the target takes lists; a held or busy snapshot is spared (reported), not fatal
        pruned, self.spared_on_target = ops.destroy_snapshots(
            self.target_shell, fulls, self.target_caps, self.ctx.zfs, check=self.guard
        )
        return pruned

    # -- bookkeeping -----------------------------------------------------------------------------------
    def record_success(self, dataset: str, sent_bytes: int, seconds: float, newest_creation: int) -> None:
        """State for `status` and metrics, with its TTL and index (observability.state), in one MULTI. Ends
        the failing streak, and clears this dataset's line in every ERROR_ file a failure of it was written
        to (hoster_tasks.failed) first: a crash in between leaves the failure listed, so a retry clears it."""
        now = time.time()
        node, key = self.ctx.settings.node_name, keys.replication_state(self.ctx.settings.node_name, dataset,
                                                                        self.endpoint.name)
        recorded = [f.decode() if isinstance(f, bytes) else f for f in self.ctx.redis.hkeys(key)]
        files = failed.error_files_of(recorded)
        for name in files:
            update_errors(self.ctx.settings.error_dir, name, {}, [dataset])
        pipe = self.ctx.redis.pipeline()
        state.record_replication(pipe, node, dataset, self.endpoint.name, {
            "last_success": str(now), "bytes": str(sent_bytes), "duration": f"{seconds:.3f}",
            "error": "0", "last_error": "", "target_newest_creation": str(newest_creation),
        }, {"bytes_total": sent_bytes}, now)
        pipe.hdel(key, failed.FAILING_SINCE, failed.ATTEMPTS, *(failed.error_file_field(n) for n in files))
        pipe.execute()

    def record_failure(self, dataset: str, error: str) -> None:
        """`error_name` (the ERROR_ file this run writes, `to_<endpoint>` unless a job names it) is recorded
        so that the success of any later run clears that file's line."""
        now = time.time()
        node = self.ctx.settings.node_name
        name = self.error_name or error_name(self.endpoint.name, None)
        pipe = self.ctx.redis.pipeline()
        state.record_replication(pipe, node, dataset, self.endpoint.name,
                                 {"error": "1", "last_error": error[:2000], "last_failure": str(now),
                                  failed.error_file_field(name): str(now)},
                                 {"failures": 1, failed.ATTEMPTS: 1}, now)
        pipe.hsetnx(keys.replication_state(node, dataset, self.endpoint.name), failed.FAILING_SINCE, str(now))
        pipe.execute()


def _by_guid(snaps: Sequence[Snapshot] | None, guid: int | None) -> Snapshot | None:
    return next((s for s in snaps or [] if s.guid == guid), None) if guid is not None else None


def _without_holds(sides: Sides, target: str, released: set[int]) -> Sides:
    """`sides` with our just-released hold taken off the target's snapshots (saves a listing)."""
    if not released:
        return sides
    snaps = [replace(s, userrefs=max(s.userrefs - 1, 0)) if s.guid in released else s
             for s in sides.target[target] or []]
    return replace(sides, target={**sides.target, target: snaps})

"""Replication planning: a pure function of the two snapshot lists (names, GUIDs, creation order).

Snapshots are matched by GUID, never by name alone, and ordered by createtxg. A target whose history does
not continue the source's is `DIVERGED`: refused and reported, never rolled back or destroyed. Where the
source lost every snapshot the target has but keeps a bookmark of one (OpenZFS), the bookmark is the base:
incremental instead of refused or sent again in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from hoster_tasks.names import parse_snapshot_name
from hoster_tasks.zfs.parse import Snapshot


class Action(StrEnum):
    NOTHING = "nothing"
    FULL = "full"  # target absent: full send of the oldest, then -I to the newest
    INCREMENTAL = "incremental"  # -I from the newest common snapshot to the newest
    DIVERGED = "diverged"


class StepKind(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    snapshot: Snapshot  # what the target has after this step
    base: Snapshot | None = None  # incremental source (-I base snapshot)


@dataclass(frozen=True)
class Plan:
    action: Action
    steps: tuple[Step, ...] = ()
    common: Snapshot | None = None  # newest common snapshot (source side) before the run
    reason: str = ""

    @property
    def final_base(self) -> Snapshot | None:
        """The newest common snapshot once every step has run."""
        return self.steps[-1].snapshot if self.steps else self.common


def plan_replication(
    source: Sequence[Snapshot], target: Sequence[Snapshot] | None, bookmarks: Sequence[Snapshot] = ()
) -> Plan:
    """`target` is None when the target dataset does not exist; `bookmarks`: the source's, a last resort."""
    src = sorted(source, key=lambda s: s.createtxg)
    if not src:
        return Plan(Action.NOTHING, reason="the source has no snapshots yet")
    newest = src[-1]
    if target is None:
        steps = [Step(StepKind.FULL, src[0])]
        if len(src) > 1:
            steps.append(Step(StepKind.INCREMENTAL, newest, base=src[0]))
        return Plan(Action.FULL, tuple(steps), reason=f"target absent: full send of {src[0].name}")
    tgt = sorted(target, key=lambda s: s.createtxg)
    if not tgt:
        return Plan(Action.DIVERGED, reason="the target dataset exists but has no snapshots: refusing to overwrite it")
    target_by_guid = {s.guid: s for s in tgt}
    common = next((s for s in reversed(src) if s.guid in target_by_guid), None)
    if common is None:
        mark = next((b for b in sorted(bookmarks, key=lambda b: -b.createtxg) if b.guid in target_by_guid), None)
        if mark is not None:
            return _from_bookmark(src, tgt, mark, target_by_guid[mark.guid].createtxg)
        return Plan(
            Action.DIVERGED,
            reason=f"no snapshot in common (target has {len(tgt)}, e.g. {tgt[-1].name}): refusing to overwrite",
        )
    source_guids = {s.guid for s in src}
    common_txg = target_by_guid[common.guid].createtxg
    foreign = [s.name for s in tgt if s.createtxg > common_txg and s.guid not in source_guids]
    if foreign:
        return Plan(
            Action.DIVERGED,
            common=common,
            reason=f"target has snapshots newer than the common {common.name} that the source never had: "
            + ", ".join(foreign),
        )
    if common.guid == newest.guid:
        return Plan(Action.NOTHING, common=common, reason=f"up to date at {newest.name}")
    return Plan(
        Action.INCREMENTAL,
        (Step(StepKind.INCREMENTAL, newest, base=common),),
        common=common,
        reason=f"incremental {common.name} -> {newest.name}",
    )


def _from_bookmark(src: list[Snapshot], tgt: list[Snapshot], mark: Snapshot, mark_txg_on_target: int) -> Plan:
    """`-i ds#mark` to the first snapshot after it, then `-I` to the newest (a bookmark takes only `-i`)."""
    source_guids = {s.guid for s in src} | {mark.guid}
    foreign = [s.name for s in tgt if s.createtxg > mark_txg_on_target and s.guid not in source_guids]
    if foreign:
        return Plan(Action.DIVERGED, reason=f"target has snapshots newer than the bookmarked {mark.name} that the "
                    "source never had: " + ", ".join(foreign))
    newer = [s for s in src if s.createtxg > mark.createtxg]
    if not newer:
        return Plan(Action.NOTHING, reason=f"in sync at the bookmark {mark.full}: no newer snapshot to send")
    steps = [Step(StepKind.INCREMENTAL, newer[0], base=mark)]
    if len(newer) > 1:
        steps.append(Step(StepKind.INCREMENTAL, newer[-1], base=newer[0]))
    return Plan(Action.INCREMENTAL, tuple(steps),
                reason=f"incremental from the bookmark {mark.full} (its snapshot is gone) -> {newer[-1].name}")


def target_prune(source: Sequence[Snapshot], target: Sequence[Snapshot], base_guid: int) -> list[Snapshot]:
    """Mirror the source's pruning: target snapshots this system named that the source no longer has.

    Never the common base, never a held or cloned snapshot, never another tool's snapshot.
    """
    source_guids = {s.guid for s in source}
    return [
        s
        for s in sorted(target, key=lambda s: s.createtxg)
        if s.guid not in source_guids
        and s.guid != base_guid
        and parse_snapshot_name(s.name) is not None
        and not s.protected
    ]

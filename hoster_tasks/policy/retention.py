"""Which snapshots to destroy: keep the newest N of a type, oldest destroyed first.

Never chosen: snapshots other tools named, held or cloned snapshots, and any snapshot whose GUID is a
replication base (the newest common snapshot with a target), whatever `keep` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hoster_tasks.errors import ConfigError
from hoster_tasks.names import parse_snapshot_name, validate_stype
from hoster_tasks.zfs.parse import Snapshot


@dataclass(frozen=True)
class RetentionPlan:
    destroy: tuple[Snapshot, ...]  # oldest first
    spared: tuple[tuple[Snapshot, str], ...]  # beyond `keep` but protected, with the reason


def check_keep(keep: int) -> int:
    if not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"--keep must be at least 1 (got {keep!r}): keeping nothing is not a retention")
    return keep


def plan_retention(
    snapshots: Sequence[Snapshot], stype: str, keep: int, bases: frozenset[int] = frozenset()
) -> RetentionPlan:
    validate_stype(stype)
    check_keep(keep)
    ours = [s for s in snapshots if (n := parse_snapshot_name(s.name)) is not None and n.stype == stype]
    ours.sort(key=lambda s: s.createtxg)
    excess = ours[: max(0, len(ours) - keep)]
    destroy, spared = [], []
    for snap in excess:
        if snap.guid in bases:
            spared.append((snap, "replication base"))
        elif snap.userrefs > 0:
            spared.append((snap, "held"))
        elif snap.clones:
            spared.append((snap, "cloned"))
        else:
            destroy.append(snap)
    return RetentionPlan(tuple(destroy), tuple(spared))

"""Validation of node, dataset, VM and snapshot names, and this system's snapshot naming.

Everything that reaches a command line passes through here first: hostile input is refused with
`InvalidName` before anything runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from hoster_tasks.errors import InvalidName

SNAPSHOT_TYPES = ("custom", "frequent", "hourly", "daily", "weekly", "monthly", "yearly", "replication")

# ZFS allows [A-Za-z0-9_.:-] and (since 0.6) spaces are NOT allowed in OpenZFS component names; we also
# refuse a leading '-' so a name can never be read as an option.
_COMPONENT = re.compile(r"^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_NAME = 255  # ZFS_MAX_DATASET_NAME_LEN - 1

_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
_OURS = re.compile(
    r"^(?P<stype>" + "|".join(SNAPSHOT_TYPES) + r")_(?P<ts>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})(?:-(?P<seq>\d+))?$"
)


def _check_component(part: str, what: str, whole: str) -> None:
    if part in (".", "..") or not _COMPONENT.fullmatch(part):
        raise InvalidName(f"invalid {what} {whole!r}: component {part!r} may use only A-Z a-z 0-9 _ . : -")


def validate_dataset(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("invalid dataset name: empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"invalid dataset {name[:40]!r}...: longer than {MAX_NAME} characters")
    if "@" in name or "#" in name:
        raise InvalidName(f"invalid dataset {name!r}: a dataset name has no '@' or '#'")
    for part in name.split("/"):
        _check_component(part, "dataset", name)
    return name


def validate_vm(name: str) -> str:
    """A VM name is one dataset component."""
    if not isinstance(name, str) or not name:
        raise InvalidName("invalid VM name: empty")
    if len(name) > 200:
        raise InvalidName(f"invalid VM name {name[:40]!r}...: longer than 200 characters")
    if "/" in name:
        raise InvalidName(f"invalid VM name {name!r}: '/' is not allowed")
    _check_component(name, "VM name", name)
    return name


def validate_snapshot_name(short: str) -> str:
    """The part after '@'."""
    if not isinstance(short, str) or not short or len(short) > 200:
        raise InvalidName(f"invalid snapshot name {short!r}")
    _check_component(short, "snapshot name", short)
    return short


def _split_object(full: str, sep: str, what: str) -> tuple[str, str]:
    """'pool/ds<sep>name' -> ('pool/ds', 'name'), each part validated (a snapshot '@', a bookmark '#')."""
    if not isinstance(full, str) or full.count(sep) != 1:
        raise InvalidName(f"invalid {what} {full!r}: expected dataset{sep}name")
    dataset, short = full.split(sep)
    validate_dataset(dataset)
    validate_snapshot_name(short)
    if len(full) > MAX_NAME:
        raise InvalidName(f"invalid {what} {full[:40]!r}...: longer than {MAX_NAME} characters")
    return dataset, short


def validate_snapshot(full: str) -> tuple[str, str]:
    """'pool/ds@snap' -> ('pool/ds', 'snap')."""
    return _split_object(full, "@", "snapshot")


def validate_bookmark(full: str) -> tuple[str, str]:
    """'pool/ds#mark' -> ('pool/ds', 'mark')."""
    return _split_object(full, "#", "bookmark")


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NODE.fullmatch(name):
        raise InvalidName(f"invalid node name {name!r}: use A-Z a-z 0-9 _ . - (max 63)")
    return name


def validate_stype(stype: str) -> str:
    if stype not in SNAPSHOT_TYPES:
        raise InvalidName(f"invalid snapshot type {stype!r}: one of {', '.join(SNAPSHOT_TYPES)}")
    return stype


@dataclass(frozen=True, order=True)
class SnapshotName:
    """A name this system made: <type>_YYYY-MM-DD_HH-MM-SS[-N]. Ordered by time, then sequence."""

    taken_at: datetime
    seq: int
    stype: str

    def __str__(self) -> str:
        base = f"{self.stype}_{self.taken_at.strftime(_TIME_FORMAT)}"
        return f"{base}-{self.seq}" if self.seq else base


def make_snapshot_name(stype: str, now: datetime, existing: set[str] | frozenset[str] = frozenset()) -> str:
    """A fresh name for `now`; a second snapshot in the same second gets a -1, -2 ... suffix."""
    validate_stype(stype)
    now = now.astimezone(UTC).replace(microsecond=0)
    seq = 0
    while str(name := SnapshotName(now, seq, stype)) in existing:
        seq += 1
    return str(name)


def parse_snapshot_name(short: str) -> SnapshotName | None:
    """None for names other tools made: those are listed but never pruned."""
    m = _OURS.fullmatch(short)
    if not m:
        return None
    try:
        taken = datetime.strptime(m["ts"], _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:  # shaped like ours but not a real time (2023-02-30): not ours, never pruned
        return None
    return SnapshotName(taken, int(m["seq"] or 0), m["stype"])


def vm_of(dataset: str, roots: list[str]) -> str | None:
    """The VM name if `dataset` is a direct child of one of the roots."""
    for root in roots:
        if dataset.startswith(root + "/") and "/" not in dataset[len(root) + 1 :]:
            return dataset[len(root) + 1 :]
    return None

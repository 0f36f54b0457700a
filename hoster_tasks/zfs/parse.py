"""Parsers for zfs output. Pure functions of text."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    dataset: str
    name: str  # the part after '@'
    guid: int
    createtxg: int
    creation: int = 0  # unix seconds
    used: int = 0
    referenced: int = 0
    userrefs: int = 0
    clones: str = ""
    bookmark: bool = False  # a bookmark (ds#name): an incremental source only, holds no data

    @property
    def full(self) -> str:
        return f"{self.dataset}{'#' if self.bookmark else '@'}{self.name}"

    @property
    def protected(self) -> bool:
        """Held or cloned: destroying it would fail or lose a clone's origin."""
        return self.userrefs > 0 or bool(self.clones)


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """`zfs get -Hp -o name,property,value ...` -> {name: {property: value}}."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t", 2)  # a user property's value may itself hold a tab
        if len(parts) != 3:
            raise ValueError(f"unexpected zfs get line: {line!r}")
        name, prop, value = parts
        out[name][prop] = value
    return dict(out)


def _int(value: str | None) -> int:
    if value in (None, "", "-"):
        return 0
    assert value is not None
    return int(value)


def snapshots_from_get(props: dict[str, dict[str, str]], sep: str = "@") -> dict[str, list[Snapshot]]:
    """Group snapshots (bookmarks with sep="#") by dataset, oldest first (by createtxg: names and clocks
    can lie)."""
    by_ds: dict[str, list[Snapshot]] = defaultdict(list)
    for full, p in props.items():
        if sep not in full:
            continue
        ds, name = full.split(sep, 1)
        by_ds[ds].append(
            Snapshot(
                dataset=ds,
                name=name,
                guid=_int(p.get("guid")),
                createtxg=_int(p.get("createtxg")),
                creation=_int(p.get("creation")),
                used=_int(p.get("used")),
                referenced=_int(p.get("referenced")),
                userrefs=_int(p.get("userrefs")),
                clones="" if p.get("clones") in (None, "-") else p.get("clones", ""),
                bookmark=sep == "#",
            )
        )
    return {ds: sorted(snaps, key=lambda s: s.createtxg) for ds, snaps in by_ds.items()}


def bookmarks_from_get(props: dict[str, dict[str, str]]) -> dict[str, list[Snapshot]]:
    """The bookmarks (`ds#name`) a recursive `zfs get` lists beside the snapshots on OpenZFS."""
    return snapshots_from_get(props, sep="#")


def datasets_from_get(props: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {name: p for name, p in props.items() if "@" not in name and "#" not in name}


def parse_names(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_send_size(text: str) -> int | None:
    """`zfs send -nP` prints a line `size\t<bytes>` (OpenZFS) somewhere in its output."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
            return int(parts[1])
    return None

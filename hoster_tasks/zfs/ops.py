"""ZFS operations as small functions of a shell (zettarepl style): build argv in `commands`, run, parse."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from hoster_tasks.errors import DatasetBusy, DatasetNotFound, SnapshotHeld
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs.parse import Snapshot, parse_get, parse_names, snapshots_from_get
from hoster_tasks.zfs.probe import Capabilities
from hoster_tasks.zfs.shell import Shell

PARENT_PROPERTY = "hoster-tasks:parent"  # node that owns a VM; absent = the node it is on
RESUME_TOKEN = "receive_resume_token"  # set on a dataset whose resumable receive was cut
BASE_PROPERTY_PREFIX = "hoster-tasks:base."  # + target name: GUID of the newest common snapshot
HOLD_TAG_PREFIX = "hoster-tasks."  # + target name
# + target name: GUID of the snapshot being sent there, recorded before the send starts. Retention spares
# it like the base: a worker killed between the end of a receive and the recording of the new base would
# otherwise leave the target's newest snapshot prunable on the source (and the next run "diverged").
SENDING_PROPERTY_PREFIX = "hoster-tasks:sending."


# + target name + ":" + snapshot name: the bookmark of the base (node names have no ':', so it parses back)
BOOKMARK_PREFIX = "hoster-tasks:"


def bookmark_prefix(target: str) -> str:
    return f"{BOOKMARK_PREFIX}{target}:"


def bookmark_name(target: str, snapshot_name: str) -> str:
    return bookmark_prefix(target) + snapshot_name


def base_property(target: str) -> str:
    return BASE_PROPERTY_PREFIX + target


def sending_property(target: str) -> str:
    return SENDING_PROPERTY_PREFIX + target


def hold_tag(target: str) -> str:
    return HOLD_TAG_PREFIX + target


def snapshot_props(caps: Capabilities) -> tuple[str, ...]:
    return cmd.SNAPSHOT_PROPS + (("clones",) if caps.clones_property else ())


def children_props(
    shell: Shell, roots: Sequence[str], props: Sequence[str], zfs: str = cmd.ZFS
) -> dict[str, dict[str, str]]:
    """{direct child of a root: {prop: value}}, one `zfs list -o` per root (a missing root is skipped, and
    does not hide the others). A line whose values hold a tab (a user property set by hand) cannot be split
    by position: those datasets are read again with `zfs get`, whose lines can."""
    out: dict[str, dict[str, str]] = {}
    unsure: list[str] = []
    for root in roots:
        try:
            text = shell.run(cmd.list_children_props(root, props, zfs)).stdout
        except DatasetNotFound:
            continue
        for line in text.splitlines():
            name, _, rest = line.partition("\t")
            if "@" in name or name.count("/") != root.count("/") + 1:
                continue
            values = rest.split("\t")
            if len(values) == len(props):
                out[name] = dict(zip(props, values, strict=True))
            else:
                unsure.append(name)
    if unsure:
        out.update(get_properties(shell, unsure, props, zfs=zfs))
    return out


def get_properties(
    shell: Shell, datasets: Iterable[str], props: Sequence[str], recursive: bool = False, zfs: str = cmd.ZFS
) -> dict[str, dict[str, str]]:
    datasets = list(datasets)
    if not datasets:
        return {}
    return parse_get(shell.run(cmd.get_props(datasets, props, recursive, zfs)).stdout)


def list_snapshots(
    shell: Shell, datasets: Iterable[str], caps: Capabilities, zfs: str = cmd.ZFS
) -> dict[str, list[Snapshot]]:
    """One batched call for all datasets; only snapshots of exactly these datasets are kept."""
    wanted = list(datasets)
    if not wanted:
        return {}
    props = get_properties(shell, wanted, snapshot_props(caps), recursive=True, zfs=zfs)
    found = snapshots_from_get(props)
    return {ds: found.get(ds, []) for ds in wanted}


def take_snapshots(
    shell: Shell, datasets: Sequence[str], short: str, caps: Capabilities, zfs: str = cmd.ZFS
) -> list[str]:
    """Atomic where the host can (one call); one call per dataset where it cannot (zfs-fuse)."""
    if caps.multi_snapshot:
        calls = cmd.snapshot(datasets, short, zfs)
    else:
        calls = [c for ds in datasets for c in cmd.snapshot([ds], short, zfs)]
    for argv in calls:
        shell.run(argv)
    return [f"{ds}@{short}" for ds in datasets]


def descendants(shell: Shell, root: str, zfs: str = cmd.ZFS) -> set[str]:
    """Every filesystem under `root` (not the root itself), at any depth."""
    return {n for n in parse_names(shell.run(cmd.list_children([root], zfs)).stdout) if n != root and "@" not in n}


def snapshot_tree(shell: Shell, root: str, short: str, zfs: str = cmd.ZFS) -> None:
    """`zfs snapshot -r root@short` (atomic: one txg for every dataset under the root), then the root's own
    snapshot destroyed at once (the root is not a VM). `drop_strays` is the other half."""
    shell.run(cmd.snapshot_recursive(root, short, zfs))
    shell.run(cmd.destroy_snapshot(f"{root}@{short}", zfs))


def drop_strays(shell: Shell, root: str, expected: Sequence[str], short: str, zfs: str = cmd.ZFS) -> list[str]:
    """After `snapshot_tree`, where the caller saw exactly `expected` under `root`: a dataset that appeared
    under the root in between is not left with a snapshot nobody asked for; its snapshot of that very call
    (the createtxg of the VMs') is destroyed. Returns what the call did not take of `expected` (a dataset
    removed in between)."""
    now = descendants(shell, root, zfs)
    present = [ds for ds in expected if ds in now]
    strays = sorted(now - set(expected))
    if strays and present:
        ref = f"{present[0]}@{short}"
        argv = cmd.get_snapshot_props([ref, *(f"{ds}@{short}" for ds in strays)], ["createtxg"], zfs)
        txgs = parse_get(shell.run(argv, check=False).stdout)
        ours = txgs.get(ref, {}).get("createtxg")
        for ds in strays:
            if ours is not None and txgs.get(f"{ds}@{short}", {}).get("createtxg") == ours:
                shell.run(cmd.destroy_snapshot(f"{ds}@{short}", zfs))
    return [f"{ds}@{short}" for ds in expected if ds not in now]


def destroy_snapshot(shell: Shell, full: str, zfs: str = cmd.ZFS) -> None:
    shell.run(cmd.destroy_snapshot(full, zfs))


def _nothing() -> None:
    pass


def destroy_snapshots(
    shell: Shell, fulls: Sequence[str], caps: Capabilities, zfs: str = cmd.ZFS,
    check: Callable[[], None] = _nothing,
) -> tuple[list[str], list[str]]:
    """Destroy the snapshots: one call per dataset where the host takes lists, one call each where it does
    not (zfs-fuse). A held or busy snapshot is spared ("full (why)"), not fatal, and the others still go: a
    list destroy is all or nothing, so a refused one is retried snapshot by snapshot. `check` runs before
    every destroy (a lock check). Returns (destroyed, spared), in the order given."""
    by_dataset: dict[str, list[str]] = {}
    for full in fulls:
        ds, name = full.split("@", 1)
        by_dataset.setdefault(ds, []).append(name)
    destroyed: list[str] = []
    spared: list[str] = []
    for ds, names in by_dataset.items():
        batches = cmd.destroy_snapshots(ds, names, zfs) if caps.destroy_list and len(names) > 1 else []
        singles = [] if batches else names
        for argv in batches:
            batch = argv[-1].split("@", 1)[1].split(",")
            check()
            try:
                shell.run(argv)
                destroyed += [f"{ds}@{n}" for n in batch]
            except (SnapshotHeld, DatasetBusy):
                singles += batch
        for name in singles:
            check()
            try:
                shell.run(cmd.destroy_snapshot(f"{ds}@{name}", zfs))
                destroyed.append(f"{ds}@{name}")
            except (SnapshotHeld, DatasetBusy) as exc:
                spared.append(f"{ds}@{name} ({exc.stderr})")
    order = {full: i for i, full in enumerate(fulls)}
    return sorted(destroyed, key=order.__getitem__), sorted(spared, key=lambda s: order[s.split(" (", 1)[0]])


def set_property(shell: Shell, dataset: str, prop: str, value: str, zfs: str = cmd.ZFS) -> None:
    shell.run(cmd.set_user_property(dataset, prop, value, zfs))

"""ZFS operations as small functions of a shell (zettarepl style): build argv in `commands`, run, parse."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hoster_tasks.errors import DatasetNotFound
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs.parse import Snapshot, parse_get, parse_names, snapshots_from_get
from hoster_tasks.zfs.probe import Capabilities
from hoster_tasks.zfs.shell import Shell

PARENT_PROPERTY = "hoster-tasks:parent"  # node that owns a VM; absent = the node it is on
BASE_PROPERTY_PREFIX = "hoster-tasks:base."  # + target name: GUID of the newest common snapshot
HOLD_TAG_PREFIX = "hoster-tasks."  # + target name


def base_property(target: str) -> str:
    return BASE_PROPERTY_PREFIX + target


def hold_tag(target: str) -> str:
    return HOLD_TAG_PREFIX + target


def snapshot_props(caps: Capabilities) -> tuple[str, ...]:
    return cmd.SNAPSHOT_PROPS + (("clones",) if caps.clones_property else ())


def child_datasets(shell: Shell, roots: Sequence[str], zfs: str = cmd.ZFS) -> list[str]:
    """Direct children of the roots (the VMs); roots that do not exist are skipped."""
    out: list[str] = []
    for root in roots:  # one call per root: a missing root must not hide the others
        try:
            names = parse_names(shell.run(cmd.list_children([root], zfs)).stdout)
        except DatasetNotFound:
            continue
        out += [n for n in names if "@" not in n and n.count("/") == root.count("/") + 1]
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


def destroy_snapshot(shell: Shell, full: str, zfs: str = cmd.ZFS) -> None:
    shell.run(cmd.destroy_snapshot(full, zfs))


def set_property(shell: Shell, dataset: str, prop: str, value: str, zfs: str = cmd.ZFS) -> None:
    shell.run(cmd.set_user_property(dataset, prop, value, zfs))

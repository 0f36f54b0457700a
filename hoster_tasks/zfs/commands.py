"""Every zfs argv this system runs is built here, as a list. Nothing here runs anything.

Names are validated by the caller's entry point and again here (cheap), so a builder can never emit an
argument that zfs would read as an option or a shell would read as syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hoster_tasks.names import validate_bookmark, validate_dataset, validate_snapshot, validate_snapshot_name

ZFS = "zfs"
# Stay far below ARG_MAX (FreeBSD 256 KiB, Linux 2 MiB) so one snapshot call never fails for length.
ARGV_BUDGET = 100_000

# Properties read for every snapshot; `clones` is optional (not on every ZFS, see probe).
SNAPSHOT_PROPS = ("guid", "createtxg", "creation", "used", "referenced", "userrefs")


@dataclass(frozen=True)
class SendOptions:
    raw: bool = False  # -w: encrypted datasets stay encrypted on the target
    resume_token: str | None = None
    dry_run: bool = False  # -nP: size estimate only


def snapshot(datasets: Sequence[str], short: str, zfs: str = ZFS) -> list[list[str]]:
    """`zfs snapshot a@s b@s ...`: atomic across datasets; split only when the argv would get too long."""
    validate_snapshot_name(short)
    calls: list[list[str]] = []
    current: list[str] = []
    size = 0
    for ds in datasets:
        arg = f"{validate_dataset(ds)}@{short}"
        if current and size + len(arg) + 1 > ARGV_BUDGET:
            calls.append([zfs, "snapshot", *current])
            current, size = [], 0
        current.append(arg)
        size += len(arg) + 1
    if current:
        calls.append([zfs, "snapshot", *current])
    return calls


def snapshot_recursive(root: str, short: str, zfs: str = ZFS) -> list[str]:
    """`zfs snapshot -r root@s`: the root and every dataset under it, atomically (one txg). The only atomic
    multi-dataset snapshot zfs-fuse has; the caller uses it only where the root's descendants are exactly
    the datasets asked for, and destroys the root's own snapshot at once (`destroy_snapshot`)."""
    validate_snapshot_name(short)
    return [zfs, "snapshot", "-r", f"{validate_dataset(root)}@{short}"]


def destroy_snapshot(full: str, zfs: str = ZFS) -> list[str]:
    validate_snapshot(full)
    return [zfs, "destroy", full]


def destroy_snapshots(dataset: str, names: Sequence[str], zfs: str = ZFS) -> list[list[str]]:
    """`zfs destroy ds@a,b,c` (OpenZFS: one call, all or nothing); split when the list would get too long
    (it is one argument: Linux allows 128 KiB per argument). Not for zfs-fuse, which takes one snapshot per
    call (see probe.Capabilities.destroy_list)."""
    validate_dataset(dataset)
    calls: list[list[str]] = []
    current: list[str] = []
    size = len(dataset) + 1
    for name in names:
        validate_snapshot_name(name)
        if current and size + len(name) + 1 > ARGV_BUDGET:
            calls.append([zfs, "destroy", f"{dataset}@{','.join(current)}"])
            current, size = [], len(dataset) + 1
        current.append(name)
        size += len(name) + 1
    if current:
        calls.append([zfs, "destroy", f"{dataset}@{','.join(current)}"])
    return calls


_PROPERTY = re.compile(r"[a-z0-9][a-z0-9:._-]*")


def _check_property(prop: str) -> str:
    if not _PROPERTY.fullmatch(prop):
        raise ValueError(f"invalid property name {prop!r}")
    return prop


def get_props(datasets: Iterable[str], props: Sequence[str], recursive: bool = True, zfs: str = ZFS) -> list[str]:
    """One batched listing of the given datasets only (never the whole pool)."""
    names = [validate_dataset(ds) for ds in datasets]
    if not props:
        raise ValueError("no properties asked for")
    for prop in props:
        _check_property(prop)
    flags = ["-Hp", "-r"] if recursive else ["-Hp"]
    return [zfs, "get", *flags, "-o", "name,property,value", ",".join(props), *names]


def get_snapshot_props(snapshots: Iterable[str], props: Sequence[str], zfs: str = ZFS) -> list[str]:
    """`zfs get -Hp` of the named snapshots only (a name that does not exist is reported on stderr)."""
    names = [s for s in snapshots if validate_snapshot(s)]
    if not props:
        raise ValueError("no properties asked for")
    return [zfs, "get", "-Hp", "-o", "name,property,value", ",".join(_check_property(p) for p in props), *names]


def list_children(roots: Iterable[str], zfs: str = ZFS) -> list[str]:
    names = [validate_dataset(r) for r in roots]
    return [zfs, "list", "-H", "-o", "name", "-r", *names]


def list_children_props(root: str, props: Sequence[str], zfs: str = ZFS) -> list[str]:
    """Every filesystem under `root` with `props`, a line each (`name<TAB>value...`): one walk of the tree,
    where `list_children` and a `zfs get` of what it found take two (zfs-fuse: 0.77 s for 800 VMs vs 1.2 s)."""
    if not props:
        raise ValueError("no properties asked for")
    return [zfs, "list", "-H", "-o", ",".join(["name", *(_check_property(p) for p in props)]), "-r",
            validate_dataset(root)]


def send(snapshot_full: str, base: str | None = None, opts: SendOptions = SendOptions(), zfs: str = ZFS) -> list[str]:
    """Full send of `snapshot_full`, or `-I base` (every intermediate snapshot) when a base is given; from a
    bookmark (`ds#mark`) `-i` (ZFS takes a bookmark only there: the intermediates need a second step)."""
    argv = [zfs, "send"]
    if opts.dry_run:
        argv.append("-nP")
    if opts.resume_token is not None:
        if not opts.resume_token.replace("-", "").isalnum():
            raise ValueError("resume token has unexpected characters")
        return [*argv, "-t", opts.resume_token]
    if opts.raw:
        argv.append("-w")
    ds, _ = validate_snapshot(snapshot_full)
    if base is not None:
        base_ds, _ = validate_bookmark(base) if "#" in base else validate_snapshot(base)
        if base_ds != ds:
            raise ValueError(f"incremental base {base} is not a snapshot of {ds}")
        argv += ["-i" if "#" in base else "-I", base]
    return [*argv, snapshot_full]


def bookmark(snapshot_full: str, bookmark_full: str, zfs: str = ZFS) -> list[str]:
    """`zfs bookmark ds@snap ds#mark` (OpenZFS): a base to send from after the snapshot is gone."""
    validate_snapshot(snapshot_full)
    validate_bookmark(bookmark_full)
    return [zfs, "bookmark", snapshot_full, bookmark_full]


def destroy_bookmark(bookmark_full: str, zfs: str = ZFS) -> list[str]:
    validate_bookmark(bookmark_full)
    return [zfs, "destroy", bookmark_full]


RECEIVE_NATIVE_PROPS = frozenset({"readonly"})  # the native properties a receive may set (`-o`)


def receive(
    target: str, resumable: bool = False, zfs: str = ZFS, props: Mapping[str, str] | None = None
) -> list[str]:
    """Never `-F`: a target that changed is refused, not rolled back. `-u`: copies are not mounted. `props`
    (`-o p=v`) are set as the receive creates the dataset, so even a partly received copy carries them."""
    validate_dataset(target)
    argv = [zfs, "receive", "-u"]
    if resumable:
        argv.append("-s")
    for prop, value in (props or {}).items():
        if prop not in RECEIVE_NATIVE_PROPS:
            _check_user_property(prop, value)
        argv += ["-o", f"{prop}={value}"]
    return [*argv, target]


def receive_abort(target: str, zfs: str = ZFS) -> list[str]:
    return [zfs, "receive", "-A", validate_dataset(target)]


def hold(tag: str, full: str, zfs: str = ZFS) -> list[str]:
    validate_snapshot_name(tag)
    validate_snapshot(full)
    return [zfs, "hold", tag, full]


def release(tag: str, full: str, zfs: str = ZFS) -> list[str]:
    validate_snapshot_name(tag)
    validate_snapshot(full)
    return [zfs, "release", tag, full]


def _check_user_property(prop: str, value: str) -> None:
    if ":" not in prop or not _PROPERTY.fullmatch(prop):
        raise ValueError(f"not a user property: {prop!r}")
    if "\n" in value or "\0" in value:
        raise ValueError("property value may not contain newlines")


def set_user_property(dataset: str, prop: str, value: str, zfs: str = ZFS) -> list[str]:
    validate_dataset(dataset)
    _check_user_property(prop, value)
    return [zfs, "set", f"{prop}={value}", dataset]


def rollback(snapshot_full: str, zfs: str = ZFS) -> list[str]:
    """`-r`: the snapshots newer than this one are destroyed (the caller lists them to the user first)."""
    validate_snapshot(snapshot_full)
    return [zfs, "rollback", "-r", snapshot_full]


def set_readonly(dataset: str, zfs: str = ZFS) -> list[str]:
    """Backup copies are read-only: a mount (even atime) would make the next incremental refuse."""
    return [zfs, "set", "readonly=on", validate_dataset(dataset)]


def rename(dataset: str, new_name: str, zfs: str = ZFS) -> list[str]:
    return [zfs, "rename", validate_dataset(dataset), validate_dataset(new_name)]


def set_writable(dataset: str, zfs: str = ZFS) -> list[str]:
    """A copy that became the VM (failover): it must be writable to run."""
    return [zfs, "set", "readonly=off", validate_dataset(dataset)]


def load_key(dataset: str, location: str, zfs: str = ZFS) -> list[str]:
    """An encrypted dataset's key from a file (`file:///path`, the only form accepted here)."""
    if not re.fullmatch(r"file:///[A-Za-z0-9_.:/@+-]+", location) or "/../" in location:
        raise ValueError(f"key location must be file:///<path> with a plain path, not {location!r}")
    return [zfs, "load-key", "-L", location, validate_dataset(dataset)]


def unmount(dataset: str, zfs: str = ZFS) -> list[str]:
    return [zfs, "umount", validate_dataset(dataset)]


def mount(dataset: str, zfs: str = ZFS) -> list[str]:
    return [zfs, "mount", validate_dataset(dataset)]


def process_args() -> list[str]:
    """Every process's command line, one a line: `ps -A -o args=` on Linux (procps) and FreeBSD alike, as
    syncoid reads it. `-ww`: never cut at a terminal width, or the dataset at the end would be lost."""
    return ["ps", "-ww", "-A", "-o", "args="]

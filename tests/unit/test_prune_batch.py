"""Target pruning: one `zfs destroy ds@a,b,c` per dataset where the target's ZFS takes lists (OpenZFS), one call
per snapshot where it does not (zfs-fuse); a held or busy snapshot is spared and reported, the others still go.
Exact argv lists on scripted hosts (tests/unit/zfs_script.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from zfs_script import OK, OPENZFS_USAGE, ZFS_FUSE_USAGE, Host

from hoster_tasks.errors import DatasetNotFound, InvalidName
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.snapshots import NodeContext
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.probe import capabilities_from_usage, probe

OPENZFS = capabilities_from_usage(OPENZFS_USAGE)
FUSE = capabilities_from_usage(ZFS_FUSE_USAGE)
T = "tank/backup/vm/vm1"
A, B, C = "hourly_2024-05-06_10-33-00", "hourly_2024-05-06_11-33-00", "hourly_2024-05-06_12-33-00"
BUSY = f"cannot destroy snapshot {T}@{B}: dataset is busy\n"


def host(usage: str) -> Host:
    shell = Host("backup1", usage)
    shell.answers[("zfs", "destroy")] = OK
    return shell


def destroys(shell: Host) -> list[list[str]]:
    return [c for c in shell.calls if c[:2] == ["zfs", "destroy"]]


# -- the argv builder ----------------------------------------------------------------------------------------------


def test_destroy_list_builder() -> None:
    assert cmd.destroy_snapshots(T, [A, B, C]) == [["zfs", "destroy", f"{T}@{A},{B},{C}"]]
    assert cmd.destroy_snapshots(T, [A], zfs="/sbin/zfs") == [["/sbin/zfs", "destroy", f"{T}@{A}"]]
    assert cmd.destroy_snapshots(T, []) == []


def test_destroy_list_builder_splits_a_list_too_long_for_one_argument() -> None:
    names = [f"hourly_2024-05-06_10-33-00-{i}" for i in range(5000)]
    calls = cmd.destroy_snapshots(T, names)
    assert len(calls) > 1
    assert all(len(c[2]) <= cmd.ARGV_BUDGET for c in calls)
    assert [n for c in calls for n in c[2].split("@", 1)[1].split(",")] == names


@pytest.mark.parametrize("bad", ["-R", "a,b", "x y", "a@b", ""])
def test_destroy_list_builder_refuses_what_zfs_would_misread(bad: str) -> None:
    with pytest.raises(InvalidName):
        cmd.destroy_snapshots(T, [A, bad])


# -- ops.destroy_snapshots -----------------------------------------------------------------------------------------


def test_one_call_per_dataset_where_lists_are_taken() -> None:
    shell = host(OPENZFS_USAGE)
    other = "tank/backup/vm/vm2"
    fulls = [f"{T}@{A}", f"{T}@{B}", f"{other}@{A}", f"{T}@{C}"]
    assert ops.destroy_snapshots(shell, fulls, OPENZFS) == (fulls, [])
    assert destroys(shell) == [["zfs", "destroy", f"{T}@{A},{B},{C}"], ["zfs", "destroy", f"{other}@{A}"]]


def test_one_call_per_snapshot_on_zfs_fuse() -> None:
    shell = host(ZFS_FUSE_USAGE)
    fulls = [f"{T}@{A}", f"{T}@{B}"]
    assert ops.destroy_snapshots(shell, fulls, FUSE) == (fulls, [])
    assert destroys(shell) == [["zfs", "destroy", f"{T}@{A}"], ["zfs", "destroy", f"{T}@{B}"]]


def test_a_list_refused_for_one_busy_snapshot_falls_back_to_one_by_one() -> None:
    shell = host(OPENZFS_USAGE)
    shell.answers[("zfs", "destroy", f"{T}@{A},{B},{C}")] = (1, "", BUSY)  # all or nothing: nothing went
    shell.answers[("zfs", "destroy", f"{T}@{B}")] = (1, "", BUSY)
    checks: list[int] = []

    destroyed, spared = ops.destroy_snapshots(shell, [f"{T}@{A}", f"{T}@{B}", f"{T}@{C}"], OPENZFS,
                                              check=lambda: checks.append(1))

    assert destroyed == [f"{T}@{A}", f"{T}@{C}"]
    assert spared == [f"{T}@{B} ({BUSY.strip()})"]
    assert destroys(shell) == [
        ["zfs", "destroy", f"{T}@{A},{B},{C}"],
        ["zfs", "destroy", f"{T}@{A}"], ["zfs", "destroy", f"{T}@{B}"], ["zfs", "destroy", f"{T}@{C}"],
    ]
    assert len(checks) == len(destroys(shell))  # the lock check runs before every destroy


def test_a_held_snapshot_on_zfs_fuse_is_spared_and_the_others_go() -> None:
    shell = host(ZFS_FUSE_USAGE)
    shell.answers[("zfs", "destroy", f"{T}@{A}")] = (1, "", f"cannot destroy '{T}@{A}': dataset is busy\n")
    destroyed, spared = ops.destroy_snapshots(shell, [f"{T}@{A}", f"{T}@{B}"], FUSE)
    assert destroyed == [f"{T}@{B}"] and spared == [f"{T}@{A} (cannot destroy '{T}@{A}': dataset is busy)"]


def test_other_errors_still_fail() -> None:
    shell = host(ZFS_FUSE_USAGE)
    shell.answers[("zfs", "destroy", f"{T}@{A}")] = (1, "", "could not find any snapshots to destroy\n")
    with pytest.raises(DatasetNotFound):
        ops.destroy_snapshots(shell, [f"{T}@{A}"], FUSE)


# -- through the replicator's pruning ------------------------------------------------------------------------------

ROOT, T_ROOT, VM = "zroot/vm", "tank/backup/vm", "zroot/vm/vm1"
NAMES = [f"hourly_2024-05-06_{h:02d}-33-00" for h in range(10, 15)]


class RedisMustNotBeTouched:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was used ({name})")


def pruning_replicator(target_usage: str) -> tuple[Replicator, Host]:
    """Five hourly snapshots on both sides, the newest the base; the target keeps 2: the oldest 3 go."""
    ep = Endpoint(name="backup1", host="192.0.2.10", key_file=Path("/k"), known_hosts=Path("/kh"),
                  root_map={ROOT: T_ROOT}, keep={"hourly": 2})
    src, tgt = Host("local"), host(target_usage)
    for shell, ds in ((src, VM), (tgt, T)):
        shell.dataset(ds, **{"hoster-tasks:parent": "node1"} if shell is tgt else {})
        for i, name in enumerate(NAMES):
            shell.snapshot(f"{ds}@{name}", guid=500 + i, txg=100 + i)
    ctx = NodeContext(Settings(node_name="node1", datasets=[ROOT], targets=[ep]), src, probe(src),
                      RedisMustNotBeTouched())  # type: ignore[arg-type]
    return Replicator(ctx, ep, target_shell=tgt), tgt


def test_prune_target_is_one_call_on_openzfs() -> None:
    rep, tgt = pruning_replicator(OPENZFS_USAGE)
    after = rep.list_sides([VM])
    pruned = rep._prune_target(VM, after.source[VM][-1], after)
    assert pruned == [f"{T}@{n}" for n in NAMES[:3]]
    assert destroys(tgt) == [["zfs", "destroy", f"{T}@{','.join(NAMES[:3])}"]]
    assert rep.spared_on_target == []


def test_prune_target_spares_a_busy_snapshot_and_reports_it() -> None:
    rep, tgt = pruning_replicator(ZFS_FUSE_USAGE)
    busy = f"cannot destroy '{T}@{NAMES[0]}': snapshot has dependent clones\nuse '-R' to destroy the following"
    tgt.answers[("zfs", "destroy", f"{T}@{NAMES[0]}")] = (1, "", busy)
    after = rep.list_sides([VM])

    pruned = rep._prune_target(VM, after.source[VM][-1], after)

    assert pruned == [f"{T}@{n}" for n in NAMES[1:3]]
    assert destroys(tgt) == [["zfs", "destroy", f"{T}@{n}"] for n in NAMES[:3]]
    assert rep.spared_on_target == [f"{T}@{NAMES[0]} ({busy})"]

"""Snapshots on OpenZFS 2.x vs zfs-fuse, by the exact argv lists built (hoster_tasks/zfs/ops.py,
hoster_tasks/snapshots.py prune, hoster_tasks/policy/retention.py): one atomic `zfs snapshot a@s b@s ...`
where the host can, split only past ARGV_BUDGET; one call per dataset on zfs-fuse; the `clones` property
read only where it exists, and a cloned snapshot spared by retention.

The host is a `RecordingShell` (the `Shell` protocol of hoster_tasks/zfs/shell.py) answering from canned
outputs: the real usage texts of tests/unit/fixtures for the probe, OpenZFS-style `zfs get -Hp` text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hoster_tasks.errors import SnapshotExists, zfs_error
from hoster_tasks.names import make_snapshot_name
from hoster_tasks.policy.retention import plan_retention
from hoster_tasks.settings import Settings
from hoster_tasks.snapshots import NodeContext, prune
from hoster_tasks.zfs import commands as cmd
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.probe import OPENZFS2, Capabilities, probe
from hoster_tasks.zfs.shell import DEFAULT_TIMEOUT, Result

FIXTURES = Path(__file__).parent / "fixtures"
OPENZFS_USAGE = (FIXTURES / "openzfs2_usage.txt").read_text()
ZFS_FUSE_USAGE = (FIXTURES / "zfs_fuse_usage.txt").read_text()
ROOT = "zroot/vm-encrypted"
SHORT = make_snapshot_name("hourly", datetime(2024, 5, 6, 10, 33, tzinfo=UTC))  # hourly_2024-05-06_10-33-00

Answer = tuple[int, str, str]


class RecordingShell:
    """Records every argv; answers `exact` argvs from the table, else `default`. Non-zero + check raises the
    named error via `errors.zfs_error`, as LocalShell does."""

    host = "local"

    def __init__(self, usage: str) -> None:
        self.calls: list[list[str]] = []
        self.exact: dict[tuple[str, ...], Answer] = {("zfs",): (2, "", usage)}
        self.default: Answer = (0, "", "")

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        code, out, err = self.exact.get(tuple(argv), self.default)
        if check and code != 0:
            raise zfs_error(argv, code, err, self.host)
        return Result(tuple(argv), code, out, err)

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def close(self) -> None:
        pass


def host(usage: str) -> tuple[RecordingShell, Capabilities]:
    shell = RecordingShell(usage)
    caps = probe(shell)
    shell.calls.clear()
    return shell, caps


# -- zfs snapshot --------------------------------------------------------------------------------------------------


def test_openzfs_takes_several_datasets_in_one_atomic_call() -> None:
    shell, caps = host(OPENZFS_USAGE)
    assert caps.multi_snapshot and caps == OPENZFS2
    datasets = [f"{ROOT}/vm1", f"{ROOT}/vm2", f"{ROOT}/web-01"]

    taken = ops.take_snapshots(shell, datasets, SHORT, caps)

    assert shell.calls == [["zfs", "snapshot", f"{ROOT}/vm1@{SHORT}", f"{ROOT}/vm2@{SHORT}", f"{ROOT}/web-01@{SHORT}"]]
    assert taken == [f"{ds}@{SHORT}" for ds in datasets]


def test_zfs_fuse_takes_one_call_per_dataset() -> None:
    shell, caps = host(ZFS_FUSE_USAGE)
    assert not caps.multi_snapshot
    datasets = [f"{ROOT}/vm1", f"{ROOT}/vm2", f"{ROOT}/web-01"]

    taken = ops.take_snapshots(shell, datasets, SHORT, caps)

    assert shell.calls == [["zfs", "snapshot", f"{ds}@{SHORT}"] for ds in datasets]
    assert taken == [f"{ds}@{SHORT}" for ds in datasets]


def _datasets_with_arg_length(n: int, arg_len: int) -> list[str]:
    """n dataset names whose `name@SHORT` argument is exactly arg_len characters."""
    prefix = f"{ROOT}/"
    width = arg_len - len(prefix) - 1 - len(SHORT)
    out = [f"{prefix}vm{i:05d}-".ljust(len(prefix) + width, "x") for i in range(n)]
    assert all(len(f"{ds}@{SHORT}") == arg_len for ds in out)
    return out


def test_one_call_up_to_the_argv_budget_exactly() -> None:
    shell, caps = host(OPENZFS_USAGE)
    per = 250  # 249 characters + the separator
    datasets = _datasets_with_arg_length(cmd.ARGV_BUDGET // per, per - 1)
    ops.take_snapshots(shell, datasets, SHORT, caps)
    assert shell.calls == [["zfs", "snapshot", *(f"{ds}@{SHORT}" for ds in datasets)]]
    assert sum(len(a) + 1 for a in shell.calls[0][2:]) == cmd.ARGV_BUDGET


def test_split_only_past_the_argv_budget() -> None:
    shell, caps = host(OPENZFS_USAGE)
    per = 250
    fit = cmd.ARGV_BUDGET // per
    datasets = _datasets_with_arg_length(2 * fit + 1, per - 1)

    taken = ops.take_snapshots(shell, datasets, SHORT, caps)

    args = [f"{ds}@{SHORT}" for ds in datasets]
    assert shell.calls == [
        ["zfs", "snapshot", *args[:fit]],
        ["zfs", "snapshot", *args[fit: 2 * fit]],
        ["zfs", "snapshot", *args[2 * fit:]],
    ]
    assert all(sum(len(a) + 1 for a in call[2:]) <= cmd.ARGV_BUDGET for call in shell.calls)
    assert taken == args


def test_a_refused_snapshot_raises_its_named_error() -> None:
    shell, caps = host(OPENZFS_USAGE)
    argv = ("zfs", "snapshot", f"{ROOT}/vm1@{SHORT}", f"{ROOT}/vm2@{SHORT}")
    shell.exact[argv] = (1, "", f"cannot create snapshot '{ROOT}/vm2@{SHORT}': dataset already exists\n"
                                "no snapshots were created\n")
    with pytest.raises(SnapshotExists):
        ops.take_snapshots(shell, [f"{ROOT}/vm1", f"{ROOT}/vm2"], SHORT, caps)
    assert shell.calls == [list(argv)]


# -- the clones property and retention ---------------------------------------------------------------------------


def test_snapshot_props_include_clones_only_on_openzfs() -> None:
    _, openzfs = host(OPENZFS_USAGE)
    _, fuse = host(ZFS_FUSE_USAGE)
    assert ops.snapshot_props(openzfs) == (*cmd.SNAPSHOT_PROPS, "clones")
    assert ops.snapshot_props(fuse) == cmd.SNAPSHOT_PROPS
    assert "clones" not in cmd.SNAPSHOT_PROPS


VM = f"{ROOT}/vm1"
HOURLY = [f"hourly_2024-05-06_{h:02d}-33-00" for h in (9, 10, 11, 12)]
CLONE = f"{ROOT}/vm1-restore-test"


def openzfs_get_output() -> str:
    """`zfs get -Hp -r -o name,property,value guid,...,clones zroot/vm-encrypted/vm1` on OpenZFS 2.2: the 10:33
    snapshot has a clone (someone restored from it); the others print an empty `clones`."""
    rows: list[tuple[str, dict[str, str]]] = [
        (VM, {"guid": "7519584935727345510", "createtxg": "118", "creation": "1714900000", "used": "53673984",
              "referenced": "5368709120", "userrefs": "-", "clones": "-"}),
    ]
    for i, name in enumerate(HOURLY):
        rows.append((f"{VM}@{name}", {
            "guid": str(1_100_000_000_000_000_000 + i), "createtxg": str(1200 + 100 * i),
            "creation": str(1_714_987_980 + 3600 * i), "used": str(1_236_992 + i), "referenced": "5368709120",
            "userrefs": "0", "clones": CLONE if i == 1 else "",
        }))
    props = ops.snapshot_props(OPENZFS2)
    return "".join(f"{name}\t{p}\t{values[p]}\n" for name, values in rows for p in props)


def test_openzfs_listing_reads_clones_and_retention_spares_a_cloned_snapshot() -> None:
    shell, caps = host(OPENZFS_USAGE)
    argv = ["zfs", "get", "-Hp", "-r", "-o", "name,property,value",
            "guid,createtxg,creation,used,referenced,userrefs,clones", VM]
    shell.exact[tuple(argv)] = (0, openzfs_get_output(), "")

    snaps = ops.list_snapshots(shell, [VM], caps)[VM]

    assert shell.calls == [argv]
    assert [s.name for s in snaps] == HOURLY
    assert [s.clones for s in snaps] == ["", CLONE, "", ""]
    plan = plan_retention(snaps, "hourly", 1)
    assert [s.name for s in plan.destroy] == [HOURLY[0], HOURLY[2]]
    assert [(s.name, why) for s, why in plan.spared] == [(HOURLY[1], "cloned")]


class _HeldLock:
    """A lock that is ours throughout (the lock itself is tested through Redis in the integration tests)."""

    def check(self) -> None:
        pass


class _NoRedis:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was used ({name})")


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("HOSTER_"):
            monkeypatch.delenv(key)
    return Settings(node_name="node1", datasets=[ROOT], zfs_command="zfs")


def test_prune_on_openzfs_never_runs_destroy_on_a_cloned_snapshot(settings: Settings) -> None:
    shell, caps = host(OPENZFS_USAGE)
    argv = ("zfs", "get", "-Hp", "-r", "-o", "name,property,value",
            "guid,createtxg,creation,used,referenced,userrefs,clones", VM)
    shell.exact[argv] = (0, openzfs_get_output(), "")
    ctx = NodeContext(settings, shell, caps, _NoRedis())  # type: ignore[arg-type]
    snaps = ops.list_snapshots(shell, [VM], caps)
    shell.calls.clear()

    destroyed, spared = prune(ctx, snaps, "hourly", 1, {VM: frozenset()}, {VM: _HeldLock()})  # type: ignore[dict-item]

    # one list destroy of exactly the two (OpenZFS takes `ds@a,b`), the cloned one not in it
    assert shell.calls == [["zfs", "destroy", f"{VM}@{HOURLY[0]},{HOURLY[2]}"]]
    assert destroyed == [f"{VM}@{HOURLY[0]}", f"{VM}@{HOURLY[2]}"]
    assert spared == [f"{VM}@{HOURLY[1]} (cloned)"]


def test_prune_on_zfs_fuse_spares_a_cloned_snapshot_when_zfs_refuses(settings: Settings) -> None:
    """Without the `clones` property retention cannot know; zfs refuses the destroy and it is spared."""
    shell, caps = host(ZFS_FUSE_USAGE)
    listing = ("zfs", "get", "-Hp", "-r", "-o", "name,property,value",
               "guid,createtxg,creation,used,referenced,userrefs", VM)
    text = "".join(line + "\n" for line in openzfs_get_output().splitlines() if "\tclones\t" not in line)
    shell.exact[listing] = (0, text, "")
    shell.exact[("zfs", "destroy", f"{VM}@{HOURLY[1]}")] = (
        1, "", f"cannot destroy '{VM}@{HOURLY[1]}': snapshot has dependent clones\n"
               f"use '-R' to destroy the following datasets:\n{CLONE}\n")
    ctx = NodeContext(settings, shell, caps, _NoRedis())  # type: ignore[arg-type]
    snaps = ops.list_snapshots(shell, [VM], caps)
    assert shell.calls == [list(listing)]
    assert all(s.clones == "" for s in snaps[VM])
    shell.calls.clear()

    destroyed, spared = prune(ctx, snaps, "hourly", 1, {VM: frozenset()}, {VM: _HeldLock()})  # type: ignore[dict-item]

    assert shell.calls == [["zfs", "destroy", f"{VM}@{h}"] for h in HOURLY[:3]]
    assert destroyed == [f"{VM}@{HOURLY[0]}", f"{VM}@{HOURLY[2]}"]
    assert len(spared) == 1 and spared[0].startswith(f"{VM}@{HOURLY[1]} (")
    assert "snapshot has dependent clones" in spared[0]

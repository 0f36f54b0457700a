"""Snapshot fan-out at the fewest ZFS commands (hoster_tasks/snapshots.py take, zfs/ops.py snapshot_tree), by
the exact argv lists on a scripted host (tests/unit/zfs_script.py) and a real private Redis for the locks:

- OpenZFS: one multi-name `zfs snapshot a@s b@s ...`, never `-r`;
- zfs-fuse: `zfs snapshot -r root@s` only where the root's descendants are exactly the VMs asked for, the root's
  own snapshot destroyed at once; a backup copy, a VM's child dataset or a VM left out rule `-r` out (one call
  per dataset then); a dataset that appeared between the listing and the `-r` loses that snapshot again;
- one listing per job (snapshots, bases, holds), made under the prune locks; pruning never destroys a base or a
  held snapshot, one `destroy ds@a,b` per dataset where the ZFS takes lists.
"""

from __future__ import annotations

import itertools
import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from zfs_script import OK, OPENZFS_USAGE, ZFS_FUSE_USAGE, Answer, Host

from hoster_tasks.names import make_snapshot_name
from hoster_tasks.settings import Settings
from hoster_tasks.snapshots import NodeContext, take
from hoster_tasks.zfs.probe import probe

ROOT = "zroot/vm-encrypted"
NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
NEW = make_snapshot_name("hourly", NOW)
OLD = [make_snapshot_name("hourly", datetime(2026, 12, 3, h, 0, tzinfo=UTC)) for h in (6, 7, 8)]


class ZfsModel(Host):
    """A Host whose `snapshot`, `destroy` and `list` change and read its objects, like a real ZFS would."""

    def __init__(self, usage: str) -> None:
        super().__init__("local", usage)
        self.txg = itertools.count(100)
        self.answers[("zfs", "snapshot")] = self._snapshot
        self.answers[("zfs", "destroy")] = self._destroy
        self.answers[("zfs", "list")] = self._list
        self.before_snapshot: list[Any] = []  # callables run just before a snapshot call (a racing change)

    def _snapshot(self, argv: list[str]) -> Answer:
        for hook in self.before_snapshot:
            hook()
        recursive = argv[2] == "-r"
        fulls = argv[3:] if recursive else argv[2:]
        todo = []
        for full in fulls:
            ds, short = full.split("@")
            names = [n for n in self.objects if "@" not in n and (n == ds or (recursive and n.startswith(ds + "/")))]
            todo += [f"{n}@{short}" for n in names]
        if any(t in self.objects for t in todo):
            return 1, "", f"cannot create snapshot '{todo[0]}': dataset already exists\n"
        txg = next(self.txg)
        for t in todo:
            self.snapshot(t, guid=txg * 1000 + len(self.objects), txg=txg)
        return OK

    def _destroy(self, argv: list[str]) -> Answer:
        ds, names = argv[2].split("@")
        for name in names.split(","):
            if self.objects.get(f"{ds}@{name}", {}).get("userrefs", "0") != "0":
                return 1, "", f"cannot destroy snapshot {ds}@{name}: dataset is busy\n"
        for name in names.split(","):
            self.objects.pop(f"{ds}@{name}")
        return OK

    def _list(self, argv: list[str]) -> Answer:
        root = argv[-1]
        names = [n for n in self.objects if "@" not in n and (n == root or n.startswith(root + "/"))]
        return 0, "".join(f"{n}\n" for n in names), ""

    def _get(self, argv: list[str]) -> Answer:
        # with -r a real zfs lists the descendants too
        o = argv.index("-o")
        props, names = argv[o + 2].split(","), argv[o + 3 :]
        out, err = [], []
        for name in names:
            if name not in self.objects:
                err.append(f"cannot open '{name}': dataset does not exist\n")
                continue
            found = [n for n in self.objects if n == name or ("-r" in argv and n.startswith((name + "@", name + "/")))]
            out += [f"{n}\t{p}\t{self.objects[n].get(p, '-')}\n" for n in found for p in props]
        return (1 if err else 0), "".join(out), "".join(err)

    def snapshots_of(self, ds: str) -> list[str]:
        return sorted(n.split("@")[1] for n in self.objects if n.startswith(ds + "@"))


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("HOSTER_"):
            monkeypatch.delenv(key)
    target = {"name": "backup1", "host": "10.0.0.2"}
    return Settings(node_name="node1", datasets=[ROOT], targets=[target], lock_attempt_seconds=0.5)  # type: ignore[list-item]


def world(usage: str, vms: int = 3) -> tuple[ZfsModel, list[str]]:
    zfs = ZfsModel(usage)
    zfs.dataset(ROOT)
    names = [f"{ROOT}/vm{i}" for i in range(vms)]
    for i, ds in enumerate(names):
        zfs.dataset(ds)
        for j, short in enumerate(OLD):
            zfs.snapshot(f"{ds}@{short}", guid=10_000 + 10 * i + j, txg=10 + j)
    return zfs, names


def run_take(zfs: ZfsModel, settings: Settings, redis_server: Any, datasets: list[str]) -> dict[str, Any]:
    ctx = NodeContext(settings, zfs, probe(zfs), redis.Redis.from_url(redis_server.url))
    zfs.calls.clear()
    return take(ctx, datasets, "hourly", 3, NOW)


def snapshot_calls(zfs: ZfsModel) -> list[list[str]]:
    return [c for c in zfs.calls if c[:2] == ["zfs", "snapshot"]]


def test_zfs_fuse_takes_the_vm_set_with_one_recursive_snapshot_and_drops_the_roots(settings: Settings,
                                                                                   private_redis: Any) -> None:
    zfs, vms = world(ZFS_FUSE_USAGE)

    out = run_take(zfs, settings, private_redis, vms)

    assert snapshot_calls(zfs) == [["zfs", "snapshot", "-r", f"{ROOT}@{NEW}"]]
    assert ["zfs", "destroy", f"{ROOT}@{NEW}"] in zfs.calls
    assert zfs.snapshots_of(ROOT) == []  # the root is not a VM: it keeps no snapshot
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]
    assert sorted(out["destroyed"]) == sorted(f"{ds}@{OLD[0]}" for ds in vms)
    for ds in vms:
        assert zfs.snapshots_of(ds) == sorted([*OLD[1:], NEW])
    gets = [c for c in zfs.calls if c[:2] == ["zfs", "get"]]
    assert len(gets) == 1 and gets[0][-1] == ROOT  # one listing, of the root, for snapshots and bases


def test_openzfs_takes_every_name_in_one_call_and_never_the_root(settings: Settings, private_redis: Any) -> None:
    zfs, vms = world(OPENZFS_USAGE)

    out = run_take(zfs, settings, private_redis, vms)

    assert snapshot_calls(zfs) == [["zfs", "snapshot", *(f"{ds}@{NEW}" for ds in vms)]]
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]
    # one list destroy per dataset
    assert sorted(c for c in zfs.calls if c[:2] == ["zfs", "destroy"]) == sorted(
        ["zfs", "destroy", f"{ds}@{OLD[0]}"] for ds in vms
    )


@pytest.mark.parametrize("other", ["backup-copy", "vm0/disk1"])
def test_no_recursive_snapshot_where_the_root_holds_anything_else(settings: Settings, private_redis: Any,
                                                                  other: str) -> None:
    """A backup copy of another node's VM, or a VM's own child dataset: `-r` would snapshot it."""
    zfs, vms = world(ZFS_FUSE_USAGE)
    zfs.dataset(f"{ROOT}/{other}")

    out = run_take(zfs, settings, private_redis, vms)

    assert snapshot_calls(zfs) == [["zfs", "snapshot", f"{ds}@{NEW}"] for ds in vms]
    assert zfs.snapshots_of(f"{ROOT}/{other}") == []
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]


def test_no_recursive_snapshot_for_a_subset_of_the_vms(settings: Settings, private_redis: Any) -> None:
    zfs, vms = world(ZFS_FUSE_USAGE)

    run_take(zfs, settings, private_redis, vms[:2])

    assert snapshot_calls(zfs) == [["zfs", "snapshot", f"{ds}@{NEW}"] for ds in vms[:2]]
    assert zfs.snapshots_of(vms[2]) == sorted(OLD)


def test_a_dataset_that_appears_before_the_recursive_snapshot_loses_it_again(settings: Settings,
                                                                             private_redis: Any) -> None:
    """A copy received (or a VM created) between the listing and `zfs snapshot -r`: its snapshot of that very
    call (same createtxg as the root's) is destroyed; the VMs keep theirs."""
    zfs, vms = world(ZFS_FUSE_USAGE)
    newcomer = f"{ROOT}/arrived"
    zfs.before_snapshot.append(lambda: zfs.dataset(newcomer))

    out = run_take(zfs, settings, private_redis, vms)

    assert snapshot_calls(zfs) == [["zfs", "snapshot", "-r", f"{ROOT}@{NEW}"]]
    assert zfs.snapshots_of(newcomer) == []
    assert zfs.snapshots_of(ROOT) == []
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]


def test_the_roots_snapshot_goes_at_once_and_the_stray_check_runs_beside_the_prune(settings: Settings,
                                                                                  private_redis: Any) -> None:
    """The root's own snapshot is destroyed right after the `-r` (never left for later); the check for
    datasets that appeared in between (a `zfs list -r`) and the prune's destroys touch different snapshots
    and run at the same time: a prune destroy starts while the check's listing is still running."""
    zfs, vms = world(ZFS_FUSE_USAGE)
    listing = zfs.answers[("zfs", "list")]

    def slow_list(argv: list[str]) -> Answer:
        time.sleep(0.3)
        answer = listing(argv)
        zfs.calls.append(["(listed)"])  # calls has each command's start; this, the listing's end
        return answer

    zfs.answers[("zfs", "list")] = slow_list

    out = run_take(zfs, settings, private_redis, vms)

    order = [c for c in zfs.calls if c[:2] in (["zfs", "snapshot"], ["zfs", "destroy"], ["zfs", "list"])
             or c == ["(listed)"]]
    assert order[:3] == [["zfs", "snapshot", "-r", f"{ROOT}@{NEW}"], ["zfs", "destroy", f"{ROOT}@{NEW}"],
                         ["zfs", "list", "-H", "-o", "name", "-r", ROOT]]
    prune_destroys = [i for i, c in enumerate(order) if c[:2] == ["zfs", "destroy"] and OLD[0] in c[2]]
    assert len(prune_destroys) == len(vms) and prune_destroys[0] < order.index(["(listed)"])
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]
    assert sorted(out["destroyed"]) == sorted(f"{ds}@{OLD[0]}" for ds in vms)


def test_pruning_spares_the_base_and_a_held_snapshot(settings: Settings, private_redis: Any) -> None:
    zfs, vms = world(ZFS_FUSE_USAGE)
    base_guid = zfs.objects[f"{vms[0]}@{OLD[0]}"]["guid"]
    zfs.objects[vms[0]]["hoster-tasks:base.backup1"] = base_guid
    zfs.objects[f"{vms[1]}@{OLD[0]}"]["userrefs"] = "1"

    out = run_take(zfs, settings, private_redis, vms)

    assert OLD[0] in zfs.snapshots_of(vms[0]) and OLD[0] in zfs.snapshots_of(vms[1])
    assert OLD[0] not in zfs.snapshots_of(vms[2])
    assert out["destroyed"] == [f"{vms[2]}@{OLD[0]}"]
    assert sorted(out["spared"]) == [f"{vms[0]}@{OLD[0]} (replication base)", f"{vms[1]}@{OLD[0]} (held)"]
    assert not any(c[:2] == ["zfs", "destroy"] and c[2] in (f"{vms[0]}@{OLD[0]}", f"{vms[1]}@{OLD[0]}")
                   for c in zfs.calls)


def test_a_replicating_vm_is_snapshotted_and_its_prune_deferred(settings: Settings, private_redis: Any) -> None:
    from hoster_tasks import keys
    from hoster_tasks.locks import DatasetLock, LockSpec

    zfs, vms = world(ZFS_FUSE_USAGE)
    client = redis.Redis.from_url(private_redis.url)
    with DatasetLock(client, LockSpec("node1", vms[1], lease=30, wait=1)):
        out = run_take(zfs, settings, private_redis, vms)
    assert out["deferred"] == [vms[1]]
    assert out["taken"] == [f"{ds}@{NEW}" for ds in vms]  # all of them, in the one -r call
    assert OLD[0] in zfs.snapshots_of(vms[1])
    assert client.hgetall(keys.deferred_prunes("node1", vms[1])) == {b"hourly": b"3"}

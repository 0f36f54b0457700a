"""Snapshots through the real parts: CLI -> Redis -> node worker -> zfs-fuse, with retention and locks."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis as redis_lib
from harness import zfs as hz
from scenario import make_vms, node_env, snapshot_names

from hoster_tasks.locks import DatasetLock, LockSpec
from hoster_tasks.names import parse_snapshot_name


def test_snapshot_new_all_and_retention_per_type(pool_factory, worker_factory, cli):
    pool = pool_factory()
    a, b, c = make_vms(pool, "a", "b", "c")
    foreign = hz.snapshot(a, "autosnap_2023-08-12_13:21:36_hourly")  # another tool's: never pruned
    worker_factory("n1", node_env(pool))

    new = cli("snapshot", "new", "a")
    assert new.returncode == 0, new.stderr
    custom = snapshot_names(a)[-1]
    assert parse_snapshot_name(custom).stype == "custom"

    for _ in range(4):
        res = cli("snapshot", "all", "--stype", "hourly", "--keep", "2")
        assert res.returncode == 0, res.stderr
    for ds in (a, b, c):
        hourly = [n for n in snapshot_names(ds) if n.startswith("hourly_")]
        assert len(hourly) == 2, (ds, snapshot_names(ds))
    # the newest two survive: they are the last two taken (createtxg order)
    assert [n for n in snapshot_names(a) if n.startswith("hourly_")] == snapshot_names(a)[-2:]
    assert custom in snapshot_names(a)
    assert foreign.split("@")[1] in snapshot_names(a)

    listed = cli("snapshot", "list-all", "--json")
    rows = json.loads(listed.stdout)
    assert sorted(r["snapshot"] for r in rows) == sorted(s.name for ds in (a, b, c) for s in hz.snapshots(ds))
    table = cli("snapshot", "list-all").stdout
    assert "Hoster ZFS Snapshots" in table and "Snapshot Size Bytes" in table and "╭" in table
    assert f"{a}@{custom}" in table

    one = cli("snapshot", "list", "b", "--json")
    assert {r["vm"] for r in json.loads(one.stdout)} == {"b"}


def test_same_second_snapshots_do_not_collide(pool_factory, worker_factory, app):
    pool = pool_factory()
    (a,) = make_vms(pool, "a")
    worker_factory("n1", node_env(pool), args=["-c", "3"])
    results = [app.send_task("hoster.snapshot.take", args=["a", "daily"], queue="hoster.node.n1") for _ in range(3)]
    taken = [r.get(timeout=60)["taken"][0] for r in results]
    assert len(set(taken)) == 3
    assert sorted(s.name for s in hz.snapshots(a)) == sorted(taken)


def test_keep_below_one_is_refused(cli):
    res = cli("snapshot", "all", "--stype", "hourly", "--keep", "0")
    assert res.returncode == 2
    assert "at least 1" in res.stderr


def test_two_nodes_each_take_only_their_own_work(pool_factory, worker_factory, cli):
    p1, p2 = pool_factory(), pool_factory()
    (a,) = make_vms(p1, "alpha")
    (b,) = make_vms(p2, "beta")
    w1 = worker_factory("n1", node_env(p1))
    w2 = worker_factory("n2", node_env(p2))

    assert cli("snapshot", "new", "alpha").returncode == 0
    assert cli("snapshot", "new", "beta").returncode == 0
    assert len(snapshot_names(a)) == 1 and len(snapshot_names(b)) == 1
    res = cli("snapshot", "all", "--stype", "daily", "--keep", "3")
    assert res.returncode == 0, res.stderr
    assert "[n1]" in res.stdout and "[n2]" in res.stdout
    assert len(snapshot_names(a)) == 2 and len(snapshot_names(b)) == 2
    time.sleep(0.5)  # let the log lines land
    log1, log2 = w1.log_path.read_text(), w2.log_path.read_text()
    # task results are logged by the worker that ran them: each dataset only in its own node's log
    assert f"{a}@" in log1 and f"{a}@" not in log2
    assert f"{b}@" in log2 and f"{b}@" not in log1


def test_snapshot_waits_for_a_rollback_then_fails_busy_but_not_for_a_replication(
    pool_factory, worker_factory, cli, redis_server
):
    pool = pool_factory()
    (a,) = make_vms(pool, "a")
    worker_factory("n1", node_env(pool, HOSTER_LOCK_WAIT_SECONDS=3))
    client = redis_lib.Redis.from_url(redis_server.url)
    replicating = DatasetLock(client, LockSpec("n1", a, lease=30, wait=1)).acquire()
    rolling_back = DatasetLock(client, LockSpec("n1", a, lease=30, wait=1, kind="snapshot")).acquire()
    try:
        res = cli("snapshot", "new", "a")
        assert res.returncode == 1
        assert "busy" in res.stderr and "rollback" in res.stderr and "waited 3s" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "MaxRetries" not in res.stderr
        assert snapshot_names(a) == []
    finally:
        rolling_back.release()
    try:
        assert cli("snapshot", "new", "a").returncode == 0  # while the dataset is replicating: at once
    finally:
        replicating.release()
    assert len(snapshot_names(a)) == 1


HOSTILE = ["a;rm -rf /", "$(touch /tmp/pwned)", "`id`", "../etc", "a b", "x" * 300, "-rf", "a\nb", ""]


def test_hostile_vm_names_rejected_before_anything_runs(pool_factory, worker_factory, cli):
    pool = pool_factory()
    (a,) = make_vms(pool, "a")
    worker = worker_factory("n1", node_env(pool))
    for name in HOSTILE:
        res = cli("snapshot", "new", "--", name)  # `--`: so "-rf" reaches the validator, not argparse
        assert res.returncode == 1, name
        assert "invalid" in res.stderr.lower() and "Traceback" not in res.stderr, (name, res.stderr)
    assert "hoster.snapshot.take[" not in worker.log_path.read_text()  # nothing was even queued
    assert snapshot_names(a) == []


def test_hostile_name_sent_around_the_client_fails_in_the_worker_without_running_zfs(pool_factory, worker_factory):
    from hoster_tasks.celery_app import app

    pool = pool_factory()
    (a,) = make_vms(pool, "a")
    worker_factory("n1", node_env(pool))
    res = app.send_task("hoster.snapshot.take", args=["a;zfs destroy -r x", "custom"], queue="hoster.node.n1")
    with pytest.raises(Exception) as err:
        res.get(timeout=30)
    assert "invalid VM name" in str(err.value)
    res = app.send_task("hoster.snapshot.destroy", args=[f"{a}@x;rm -rf /"], queue="hoster.node.n1")
    with pytest.raises(Exception) as err:
        res.get(timeout=30)
    assert "invalid snapshot" in str(err.value)
    assert snapshot_names(a) == []


def test_odd_but_valid_name_and_destroy(pool_factory, worker_factory, cli):
    pool = pool_factory()
    (odd,) = make_vms(pool, "web:01.prod_x-y")
    worker_factory("n1", node_env(pool))
    res = cli("snapshot", "new", "web:01.prod_x-y")
    assert res.returncode == 0, res.stderr
    (snap,) = snapshot_names(odd)
    gone = cli("snapshot", "destroy", f"{odd}@{snap}")
    assert gone.returncode == 0, gone.stderr
    assert snapshot_names(odd) == []


def test_unknown_vm_and_no_broker_are_one_line_errors(pool_factory, worker_factory, cli):
    pool = pool_factory()
    make_vms(pool, "a")
    worker_factory("n1", node_env(pool))
    res = cli("snapshot", "new", "nope")
    assert res.returncode == 1 and "unknown VM 'nope'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("snapshot", "list-all", env={"HOSTER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.returncode == 1 and "cannot reach the broker" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_snapshot_all_waits_for_a_rollback_without_snapshotting_the_others_twice(
    pool_factory, worker_factory, cli, redis_server
):
    pool = pool_factory()
    a, b, c = make_vms(pool, "a", "b", "c")
    worker_factory("n1", node_env(pool, HOSTER_LOCK_WAIT_SECONDS=20, HOSTER_LOCK_ATTEMPT_SECONDS=0.5),
                   args=["-c", "1"])
    client = redis_lib.Redis.from_url(redis_server.url)
    lock = DatasetLock(client, LockSpec("n1", b, lease=30, wait=1, kind="snapshot")).acquire()  # b rolls back
    releaser = threading.Timer(3, lock.release)
    releaser.start()
    try:
        res = cli("snapshot", "all", "--stype", "daily", "--keep", "3")
    finally:
        releaser.join()
    assert res.returncode == 0, res.stderr
    # one worker slot: the wait happened as retries, not by blocking the slot; each VM got exactly one
    assert [len(snapshot_names(ds)) for ds in (a, b, c)] == [1, 1, 1]


def test_snapshot_all_on_zfs_fuse_is_one_atomic_recursive_snapshot_of_exactly_the_vms(
    pool_factory, worker_factory, cli
):
    """zfs-fuse has no multi-name snapshot: where the VM root holds exactly the node's VMs, `snapshot all`
    takes them with one `zfs snapshot -r` (one txg: the same createtxg on every VM), and the root keeps no
    snapshot. Once the root also holds a backup copy of another node's VM, the copy is never snapshotted
    (one call per VM then), and retention still prunes only what it should."""
    from hoster_tasks.zfs.ops import PARENT_PROPERTY

    pool = pool_factory()
    vms = make_vms(pool, "a", "b", "c", "d")
    root = pool.ds("vm")
    worker_factory("n1", node_env(pool))

    for _ in range(3):
        res = cli("snapshot", "all", "--stype", "hourly", "--keep", "2")
        assert res.returncode == 0, res.stderr
    assert hz.snapshots(root) == []
    txgs = {s.createtxg for ds in vms for s in hz.snapshots(ds)[-1:]}
    assert len(txgs) == 1, txgs  # one atomic call
    assert all(len(snapshot_names(ds)) == 2 for ds in vms)

    copy = pool.create_dataset("vm/copy", {PARENT_PROPERTY: "other-node"})
    res = cli("snapshot", "all", "--stype", "hourly", "--keep", "2")
    assert res.returncode == 0, res.stderr
    assert hz.snapshots(copy) == [] and hz.snapshots(root) == []
    assert all(len(snapshot_names(ds)) == 2 for ds in vms)
    newest = {hz.snapshots(ds)[-1].createtxg for ds in vms}
    assert len(newest) == len(vms)  # one call per VM: the copy rules `-r` out

"""Replication through the real parts: two namespaced nodes with sshd, a worker on the source, zfs-fuse."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time

import redis as redis_lib
from celery.result import AsyncResult
from harness import zfs as hz
from scenario import VMS_ROOT, guids, make_vms, node_env, replicate_json, snapshot_names, two_nodes

from hoster_tasks import keys
from hoster_tasks.zfs.ops import PARENT_PROPERTY, base_property


def _digest(dataset: str) -> dict[str, str]:
    root = hz.mount(dataset)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def test_first_then_incremental_then_nothing(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(3):
        hz.write_random(vm, 2)
        assert cli("snapshot", "new", "vm1").returncode == 0

    first = replicate_json(cli, "vm1", dst.name)
    assert first["action"] == "full" and len(first["sent"]) == 2  # full of the oldest, then -I to the newest
    assert guids(copy) == guids(vm)  # every snapshot landed in one request, same GUIDs
    assert _digest(copy) == _digest(vm)
    assert hz.get_property(copy, PARENT_PROPERTY) == "src"
    assert hz.get_property(vm, base_property(dst.name)) == str(list(guids(vm).values())[-1])
    first_base = snapshot_names(vm)[-1]
    for ds in (vm, copy):  # zfs-fuse has holds: the base is held on both sides
        assert hz.get_property(f"{ds}@{first_base}", "userrefs") == "1"

    hz.write_random(vm, 1)
    cli("snapshot", "new", "vm1")
    cli("snapshot", "new", "vm1")
    second = replicate_json(cli, "vm1", dst.name)
    assert second["action"] == "incremental"
    assert guids(copy) == guids(vm) and len(guids(copy)) == 5
    assert _digest(copy) == _digest(vm)
    new_base = snapshot_names(vm)[-1]
    for ds in (vm, copy):  # the hold moved forward with the base
        assert hz.get_property(f"{ds}@{first_base}", "userrefs") == "0"
        assert hz.get_property(f"{ds}@{new_base}", "userrefs") == "1"

    third = replicate_json(cli, "vm1", dst.name)
    assert third["action"] == "nothing" and third["sent"] == [] and guids(copy) == guids(vm)


def test_diverged_target_is_refused_and_left_intact(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 1)
    cli("snapshot", "new", "vm1")
    replicate_json(cli, "vm1", dst.name)
    assert hz.get_property(copy, "readonly") == "on"  # copies are read-only after the first run
    # someone makes the copy writable, changes and snapshots it: history the source never had
    hz.set_property(copy, "readonly", "off")
    hz.write_random(copy, 1, "local-change.bin")
    hz.snapshot(copy, "custom_2099-01-01_00-00-00")
    before = guids(copy)
    cli("snapshot", "new", "vm1")

    res = cli("vm", "replicate", "vm1", "--endpoint", dst.name)
    assert res.returncode == 1
    assert "diverged" in res.stderr and "custom_2099-01-01_00-00-00" in res.stderr
    assert guids(copy) == before  # nothing destroyed, nothing rolled back
    assert (hz.mount(copy) / "local-change.bin").exists()
    error_files = list((worker.log_path.parent / "errors").glob("ERROR_*"))
    assert [p.name for p in error_files] == [f"ERROR_to_{dst.name}"]


def test_target_with_no_common_snapshot_is_refused(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.create_dataset(f"{VMS_ROOT}/vm1")  # an unrelated dataset already sits there
    hz.snapshot(copy, "theirs")
    cli("snapshot", "new", "vm1")
    res = cli("vm", "replicate", "vm1", "--endpoint", dst.name)
    assert res.returncode == 1 and "no snapshot in common" in res.stderr
    assert list(guids(copy)) == ["theirs"]
    assert hz.exists(vm)


def test_pruning_keeps_the_common_base_and_target_mirrors_source(
    node_factory, pool_factory, worker_factory, cli
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(2):
        assert cli("snapshot", "all", "--stype", "hourly", "--keep", "5").returncode == 0
    replicate_json(cli, "vm1", dst.name)
    base = snapshot_names(vm)[-1]

    # the target is down for a while; retention with keep 1 runs twice: the base must survive it
    for _ in range(2):
        res = cli("snapshot", "all", "--stype", "hourly", "--keep", "1", "--json")
        assert res.returncode == 0, res.stderr
    names = snapshot_names(vm)
    assert base in names and len(names) == 2, names  # the base, and the newest one
    assert "replication base" in res.stdout

    out = replicate_json(cli, "vm1", dst.name)
    assert out["action"] == "incremental"  # no full resend
    assert guids(copy) == guids(vm)  # the target pruned what the source pruned
    assert out["pruned_on_target"]

    # now the base has moved on: the old one goes at the next retention
    cli("snapshot", "all", "--stype", "hourly", "--keep", "1")
    assert base not in snapshot_names(vm)


def test_dataset_first_replicated_by_syncoid_continues_incrementally(
    node_factory, pool_factory, worker_factory, cli
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 2)
    cli("snapshot", "new", "vm1")
    syncoid = src.exec(
        ["syncoid", "--no-privilege-elevation", "--recvoptions=u", f"--sshkey={src.key_file}",
         f"--sshoption=UserKnownHostsFile={src.known_hosts}", "--sshoption=StrictHostKeyChecking=yes",
         vm, f"root@{dst.address}:{copy}"],
        check=False,
    )
    assert syncoid.returncode == 0, syncoid.stdout + syncoid.stderr
    synced = guids(copy)
    assert any(n.startswith("syncoid_") for n in synced)

    hz.write_random(vm, 1)
    cli("snapshot", "new", "vm1")
    out = replicate_json(cli, "vm1", dst.name)
    assert out["action"] == "incremental"  # matched by GUID with syncoid's snapshots: no full resend
    assert set(synced.items()) <= set(guids(copy).items())
    assert guids(copy) == guids(vm)


def test_link_cut_mid_transfer_is_retried_and_completes(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 60)
    cli("snapshot", "new", "vm1")

    def cut() -> None:
        time.sleep(2)
        dst.link_down()
        time.sleep(6)
        dst.link_up()

    cutter = threading.Thread(target=cut)
    cutter.start()
    res = cli("vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "12", "--json", timeout=240)
    cutter.join()
    assert res.returncode == 0, res.stderr
    assert guids(copy) == guids(vm)
    assert _digest(copy) == _digest(vm)


def test_backup_copies_are_skipped_by_replicate_all(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    cli("snapshot", "new", "vm1")
    replicate_json(cli, "vm1", dst.name)
    # the target node runs a worker too, with the source as its own target
    back = src.endpoint(root_map={pdst.ds(VMS_ROOT): psrc.ds(VMS_ROOT)})
    worker_factory(dst, {"HOSTER_DATASETS": [pdst.ds(VMS_ROOT)], "HOSTER_HEARTBEAT_SECONDS": 1,
                         "HOSTER_TARGETS": [back]})
    res = cli("vm", "replicate-all", "--endpoint", src.name, "--node", dst.name, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["results"] == [] and "backup copy of src" in out["skipped"][0]
    # snapshot all on the target node leaves the copy alone too
    before = guids(pdst.ds(f"{VMS_ROOT}/vm1"))
    assert cli("snapshot", "all", "--stype", "hourly", "--keep", "3", "--node", dst.name).returncode == 0
    assert guids(pdst.ds(f"{VMS_ROOT}/vm1")) == before


def test_two_replications_of_one_dataset_never_overlap(node_factory, pool_factory, worker_factory, cli, app):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 24)
    cli("snapshot", "new", "vm1")

    receivers: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            # anchored: the zfs process itself, not the ssh client whose argv carries the same words
            ps = subprocess.run(["pgrep", "-f", f"^zfs receive -u {copy}$"], capture_output=True, text=True)
            receivers.append(len(ps.stdout.split()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        args = ("vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "2", "--no-wait")
        ids = [cli(*args).stdout.strip() for _ in range(2)]
        time.sleep(1)
        # 24 MiB at 2 MB/s holds the lock ~12 s; a snapshot meanwhile is taken at once (ZFS can)
        during = cli("snapshot", "new", "vm1")
        results = [AsyncResult(i, app=app).get(timeout=180) for i in ids]
    finally:
        stop.set()
        watcher.join()
    assert during.returncode == 0, during.stderr
    assert max(receivers) == 1  # the second waited for the first: never two receives at once
    # the first sent what existed when it planned; the second, after it, the snapshot taken meanwhile
    assert sorted(r["action"] for r in results) == ["full", "incremental"]
    assert guids(copy) == guids(vm)


def test_cli_shows_transfer_progress_and_rate_limit_holds(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 8)
    cli("snapshot", "new", "vm1")
    started = time.monotonic()
    res = cli("vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "2")
    elapsed = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    bars = [line for line in res.stderr.splitlines() if "MiB" in line and "%" in line]
    assert len(bars) >= 2, res.stderr  # bytes sent of the estimate, while it ran
    assert vm in bars[-1]
    assert elapsed > 3  # 8 MiB at 2 MB/s cannot take less: the limiter is real (a bound, not a timing test)


def test_a_lost_lock_stops_the_transfer_and_the_retry_completes(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    import redis as redis_lib

    from hoster_tasks import keys

    src, dst, psrc, pdst, worker = two_nodes(
        node_factory, pool_factory, worker_factory, HOSTER_LOCK_LEASE_SECONDS=3
    )
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 10)
    cli("snapshot", "new", "vm1")
    client = redis_lib.Redis.from_url(redis_server.url)
    key = keys.dataset_lock("src", vm)

    def steal() -> None:  # as if the lease had expired and another job took the lock
        deadline = time.monotonic() + 20
        while not client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        client.set(key, "intruder", px=2500)

    thief = threading.Thread(target=steal)
    thief.start()
    res = cli("vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "2", timeout=240)
    thief.join()
    assert res.returncode == 0, res.stderr
    log = worker.log_path.read_text()
    assert "LockLost" in log and "lock was lost during the transfer" in log and "retry: Retry in" in log
    assert guids(copy) == guids(vm)
    assert _digest(copy) == _digest(vm)


def _links(worker, offset: int) -> list[str]:  # type: ignore[no-untyped-def]
    text = worker.log_path.read_bytes()[offset:].decode(errors="replace")
    return re.findall(r"Task hoster\.replication\.(step|finish)\[[0-9a-f-]+\] succeeded", text)


def _accepted(node) -> int:  # type: ignore[no-untyped-def]
    return node.sshd_log.read_text().count("Accepted publickey for ")


def test_a_chain_runs_only_the_links_it_needs_over_one_kept_connection(
    node_factory, pool_factory, worker_factory, cli
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, worker_args=["-c", "1"])
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(3):
        assert cli("snapshot", "new", "vm1").returncode == 0
    offset = worker.log_path.stat().st_size
    assert replicate_json(cli, "vm1", dst.name)["action"] == "full"
    assert _links(worker, offset) == ["step", "step", "finish"]  # the plan had two steps: full, then -I

    hz.write_random(vm, 1)
    assert cli("snapshot", "new", "vm1").returncode == 0
    offset, accepted = worker.log_path.stat().st_size, _accepted(dst)
    assert replicate_json(cli, "vm1", dst.name)["action"] == "incremental"
    assert _links(worker, offset) == ["step", "finish"]  # before: step | step | finish, the second a no-op
    assert guids(copy) == guids(vm)
    time.sleep(0.3)  # sshd logs a moment after the client returns
    # the control connection the first run opened is kept by the worker process; only the data path's
    # `ssh ... zfs receive` connects (before: one more Fabric connection and probe per link)
    assert _accepted(dst) - accepted == 1


def test_replicate_all_sends_datasets_in_parallel_lanes_bounded_per_target(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    names = ("vm1", "vm2", "vm3", "vm4")
    vms = make_vms(psrc, *names)
    for root in ("two", "one"):
        pdst.create_dataset(root)
    fast = {"keepalive_seconds": 1, "connect_timeout": 3}
    targets = [dst.endpoint(name="two", root_map={psrc.ds(VMS_ROOT): pdst.ds("two")}, parallel=2, **fast),
               dst.endpoint(name="one", root_map={psrc.ds(VMS_ROOT): pdst.ds("one")}, parallel=1, **fast)]
    worker = worker_factory(src, node_env(psrc, HOSTER_TARGETS=targets), args=["-c", "4"])
    for vm in vms:
        hz.write_random(vm, 1)
    for name in names:
        assert cli("snapshot", "new", name).returncode == 0
    client = redis_lib.Redis.from_url(redis_server.url)

    for endpoint, bound in (("two", 2), ("one", 1)):
        seen: list[int] = []
        stop = threading.Event()

        def watch(seen: list[int] = seen, stop: threading.Event = stop) -> None:  # locks held at once
            while not stop.is_set():
                seen.append(sum(client.exists(keys.dataset_lock(src.name, vm)) for vm in vms))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:  # 1 MB each at 0.5 MB/s: every transfer lasts about two seconds
            res = cli("vm", "replicate-all", "--endpoint", endpoint, "--speed-limit", "0.5", "--json", timeout=120)
        finally:
            stop.set()
            watcher.join()
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert [r["dataset"] for r in out["results"]] == vms and {r["action"] for r in out["results"]} == {"full"}
        assert max(seen) == bound, (endpoint, sorted(set(seen)))  # before: one dataset after another
        for vm in vms:
            assert guids(pdst.ds(f"{endpoint}/{vm.rsplit('/', 1)[1]}")) == guids(vm)
    assert not list((worker.log_path.parent / "errors").glob("ERROR_*"))

"""Nothing lost, nothing hidden: the safety and reporting holes a review and fault runs found, each through the
real parts (zfs-fuse, Redis, sshd in namespaces, real workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib
from celery.result import AsyncResult
from harness import zfs as hz
from harness.proc import wait_until
from scenario import VMS_ROOT, guids, make_vms, node_env, replicate_json, snapshot_names, two_nodes

from hoster_tasks import keys
from hoster_tasks.zfs.ops import PARENT_PROPERTY, base_property, hold_tag, sending_property


def _receivers(copy: str) -> int:
    ps = subprocess.run(["pgrep", "-f", f"^zfs receive -u {copy}$"], capture_output=True, text=True)
    return len(ps.stdout.split())


def _error_files(worker) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {p.name: p.read_text() for p in sorted((worker.log_path.parent / "errors").glob("ERROR_*"))}


def _wait_for_lock(client: redis_lib.Redis, node: str, dataset: str) -> None:
    wait_until(lambda: bool(client.exists(keys.dataset_lock(node, dataset))), 30, f"the lock of {dataset}")


# -- 1. the new base is protected the moment it lands -------------------------------------------------------------


def test_a_run_stopped_after_its_first_link_keeps_the_snapshot_it_sent(
    node_factory, pool_factory, worker_factory, cli, app
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, HOSTER_LOCK_LEASE_SECONDS=2)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(3):
        hz.write_random(vm, 1)
        assert cli("snapshot", "new", "vm1", "--stype", "hourly").returncode == 0
    first = snapshot_names(vm)[0]
    # the chain's first link, and nothing after it: as if its worker had died right after the link
    link = app.send_task("hoster.replication.step", args=[None, vm, dst.name, None, "a-stopped-chain", None],
                         queue=keys.node_queue(src.name))
    assert link.get(timeout=120)["sent"] == [first]
    assert hz.get_property(vm, base_property(dst.name)) == str(guids(vm)[first])  # recorded by the link itself
    time.sleep(3)  # the link's lock handoff lapses with its lease; then the hourly retention runs

    res = cli("snapshot", "all", "--stype", "hourly", "--keep", "1")
    assert res.returncode == 0, res.stderr
    assert first in snapshot_names(vm)  # the replication base is spared, whatever keep says
    again = replicate_json(cli, "vm1", dst.name)
    assert again["action"] == "incremental"  # continued from the base, no full resend, no "diverged"
    assert guids(copy) == guids(vm)


def test_a_worker_killed_between_receive_and_recording_leaves_nothing_prunable(
    node_factory, pool_factory, worker_factory, cli, app
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, HOSTER_LOCK_LEASE_SECONDS=2)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(3):
        assert cli("snapshot", "new", "vm1", "--stype", "hourly").returncode == 0
    first = snapshot_names(vm)[0]
    link = app.send_task("hoster.replication.step", args=[None, vm, dst.name, None, "cut-chain", None],
                         queue=keys.node_queue(src.name))
    link.get(timeout=120)
    # as if the worker had died the moment the receive ended: the base is neither recorded nor held yet, only
    # marked by the step before it started sending
    subprocess.run(["zfs", "inherit", base_property(dst.name), vm], check=True)
    subprocess.run(["zfs", "release", hold_tag(dst.name), f"{vm}@{first}"], check=True)
    assert hz.get_property(vm, sending_property(dst.name)) == str(guids(vm)[first])
    time.sleep(3)
    assert cli("snapshot", "all", "--stype", "hourly", "--keep", "1").returncode == 0
    assert first in snapshot_names(vm)
    assert replicate_json(cli, "vm1", dst.name)["action"] == "incremental"
    assert guids(copy) == guids(vm)


# -- 2. backup copies are read-only to every public task ----------------------------------------------------------


def test_public_tasks_sent_to_a_backup_node_never_change_its_copies(
    node_factory, pool_factory, worker_factory, cli, app
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 1)
    cli("snapshot", "new", "vm1")
    replicate_json(cli, "vm1", dst.name)
    back = src.endpoint(root_map={pdst.ds(VMS_ROOT): psrc.ds(VMS_ROOT)}, connect_timeout=3)
    worker_factory(dst, node_env(pdst, HOSTER_TARGETS=[back]))
    copy_before, vm_before = guids(copy), guids(vm)
    snap = f"{copy}@{snapshot_names(copy)[0]}"
    queue = keys.node_queue(dst.name)

    sent = {
        "take": app.send_task("hoster.snapshot.take", args=["vm1", "custom", 1], queue=queue),
        "destroy": app.send_task("hoster.snapshot.destroy", args=[snap], queue=queue),
        "step": app.send_task("hoster.replication.step", args=[None, copy, src.name, None, "c", None], queue=queue),
        "finish": app.send_task("hoster.replication.finish", args=[{"bytes": 0, "seconds": 0.0}, copy, src.name, "c"],
                                queue=queue),
        "replicate": app.send_task("hoster.replication.replicate", args=["vm1", src.name], queue=queue),
    }
    for what, result in sent.items():
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE", what
        assert "backup copy" in str(result.result), (what, result.result)
    everything = app.send_task("hoster.replication.replicate_all", args=[src.name], queue=queue).get(timeout=60)
    assert everything["results"] == [] and everything["skipped"]  # the copy is skipped, not sent back
    assert guids(copy) == copy_before and guids(vm) == vm_before
    assert hz.get_property(vm, PARENT_PROPERTY) == "-" and hz.get_property(vm, "readonly") == "off"


# -- 3. one message runs once; one lock has one holder ------------------------------------------------------------


def test_a_link_delivered_twice_at_once_runs_once(node_factory, pool_factory, worker_factory, cli, app):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    worker.stop()
    worker = worker_factory(src, worker.env | {"HOSTER_NODE_NAME": src.name}, args=["-c", "2"])
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 12)
    cli("snapshot", "new", "vm1")
    receivers: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=lambda: [receivers.append(_receivers(copy)) or time.sleep(0.05)
                                               for _ in iter(lambda: stop.is_set(), True)])
    watcher.start()
    try:
        args = [None, vm, dst.name, 3.0, "one-chain", None]
        first = app.send_task("hoster.replication.step", args=args, queue=keys.node_queue(src.name), task_id="link-1")
        time.sleep(1)
        app.send_task("hoster.replication.step", args=args, queue=keys.node_queue(src.name), task_id="link-1")
        result = first.get(timeout=120)
        wait_until(lambda: "runs nothing" in worker.log_tail(200), 30, "the second delivery to give up")
    finally:
        stop.set()
        watcher.join()
    assert result["sent"] == snapshot_names(vm)
    assert max(receivers) == 1  # never two receives into the copy
    assert guids(copy) == guids(vm)


def test_a_busy_worker_reserves_no_message_it_cannot_start(
    node_factory, pool_factory, worker_factory, cli, app, redis_server
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    worker.stop()
    worker_factory(src, worker.env, args=["-c", "1"])
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 8)
    cli("snapshot", "new", "vm1")
    client = redis_lib.Redis.from_url(redis_server.url)
    queue = keys.node_queue(src.name)
    long_job = app.send_task("hoster.replication.replicate", args=["vm1", dst.name], kwargs={"speed_limit": 2.0},
                             queue=queue)
    _wait_for_lock(client, src.name, vm)
    snap = app.send_task("hoster.snapshot.take", args=["vm1", "custom"], queue=queue)
    time.sleep(2)
    # still in the queue, not moved to the worker's unacked set: Redis can never deliver it twice
    assert client.llen(queue) == 1 and long_job.state != "SUCCESS"
    long_job.get(timeout=120)
    assert len(snap.get(timeout=60)["taken"]) == 1


# -- 5. a lost job is found and re-run ----------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["worker", "pool process"])
def test_a_job_lost_mid_transfer_is_requeued_and_the_waiting_cli_follows_it(
    node_factory, pool_factory, worker_factory, cli, redis_server, what
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, HOSTER_LOCK_LEASE_SECONDS=3)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 10)
    cli("snapshot", "new", "vm1")
    client = redis_lib.Redis.from_url(redis_server.url)
    waiting: dict[str, subprocess.CompletedProcess[str]] = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("res", cli(
        "vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "2", timeout=240)))
    thread.start()
    _wait_for_lock(client, src.name, vm)
    time.sleep(1)
    if what == "worker":
        worker.kill()  # SIGKILL to every process of the worker, mid-transfer
        worker = worker_factory(src, worker.env)  # systemd restarts it
    else:  # Celery itself fails the job (WorkerLostError) at once; the worker lives on
        [job] = [json.loads(v) for v in client.hgetall(keys.running_jobs(src.name)).values()]
        os.kill(job["pid"], signal.SIGKILL)
    thread.join()
    res = waiting["res"]
    assert res.returncode == 0, res.stderr
    assert "the worker running this job died; re-queued as" in res.stderr
    assert guids(copy) == guids(vm)
    assert json.loads(cli("status", "--json").stdout)["running"] == []  # no phantom job left behind
    assert worker.running


# -- 6. snapshots are never skipped because of a replication ------------------------------------------------------


def test_snapshots_are_taken_while_replicating_and_pruning_waits_for_its_end(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory,
                                             HOSTER_LOCK_WAIT_SECONDS=14)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 40)
    for _ in range(2):
        cli("snapshot", "new", "vm1", "--stype", "hourly")
    oldest = snapshot_names(vm)[0]
    client = redis_lib.Redis.from_url(redis_server.url)
    job = cli("vm", "replicate", "vm1", "--endpoint", dst.name, "--speed-limit", "2", "--no-wait")
    _wait_for_lock(client, src.name, vm)

    hourly = cli("snapshot", "all", "--stype", "hourly", "--keep", "1", "--json")
    assert hourly.returncode == 0, hourly.stderr  # not busy: taken at once
    out = json.loads(hourly.stdout.split("\n", 1)[1])  # after the "[node]" line
    assert len(out["taken"]) == 1 and out["deferred"] == [vm] and out["destroyed"] == []
    busy = cli("snapshot", "destroy", f"{vm}@{oldest}")  # destroying still excludes the replication
    assert busy.returncode == 1 and "busy" in busy.stderr and "waited 1" in busy.stderr, busy.stderr
    assert "MaxRetries" not in busy.stderr

    AsyncResult(job.stdout.strip(), app=_app(redis_server)).get(timeout=180)
    hourlies = [n for n in snapshot_names(vm) if n.startswith("hourly_")]
    assert out["taken"][0].split("@")[1] in hourlies
    assert len(hourlies) <= 2  # pruned at the replication's end: the newest, and the base if it differs
    assert not client.exists(keys.deferred_prunes(src.name, vm))


def _app(redis_server):  # type: ignore[no-untyped-def]
    from hoster_tasks.celery_app import app

    app.conf.update(broker_url=redis_server.url, result_backend=redis_server.url)
    return app


# -- 8, 9, 10. failures always reach the operator; no false alarms ------------------------------------------------


def test_an_unreachable_target_writes_the_error_file_and_metric(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    pdst.create_dataset(VMS_ROOT)
    make_vms(psrc, "vm1")
    roots = {psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}
    wrong_keys = Path(str(dst.known_hosts) + ".wrong")
    line = dst.known_hosts.read_text().splitlines()[0].split()
    wrong_keys.write_text(f"{line[0]} {src.host_key_file.with_suffix('.pub').read_text().split()[0]} "
                          f"{src.host_key_file.with_suffix('.pub').read_text().split()[1]}\n")
    targets = [dst.endpoint(name="down", port=2, root_map=roots, connect_timeout=2),
               dst.endpoint(name="forged", known_hosts=str(wrong_keys), root_map=roots, connect_timeout=2)]
    worker = worker_factory(src, node_env(psrc, HOSTER_TARGETS=targets, HOSTER_RETRY_MAX=1,
                                          HOSTER_RETRY_BACKOFF_MAX_SECONDS=1))
    cli("snapshot", "new", "vm1")
    for endpoint in ("down", dst.address):  # the host form names the same file as the name
        res = cli("vm", "replicate-all", "--endpoint", endpoint if endpoint == "down" else "forged")
        assert res.returncode == 1
    files = _error_files(worker)
    assert set(files) == {"ERROR_to_down", "ERROR_to_forged"}
    assert psrc.ds(f"{VMS_ROOT}/vm1") in files["ERROR_to_down"]
    client = redis_lib.Redis.from_url(redis_server.url)
    for target in ("down", "forged"):
        assert client.hget(keys.replication_state(src.name, psrc.ds(f"{VMS_ROOT}/vm1"), target), "error") == b"1"


def test_one_vms_success_never_clears_another_vms_failure(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, vms=("vm1", "vm2", "vm3"))
    vm2 = psrc.ds(f"{VMS_ROOT}/vm2")
    for name in ("vm1", "vm2"):
        cli("snapshot", "new", name)
    # vm2's copy exists with history of its own: vm2 fails as diverged
    hz.create_dataset(pdst.ds(f"{VMS_ROOT}/vm2"))
    hz.snapshot(pdst.ds(f"{VMS_ROOT}/vm2"), "custom_2099-01-01_00-00-00")
    assert cli("vm", "replicate", "vm2", "--endpoint", dst.address).returncode == 1  # the host form
    assert cli("vm", "replicate", "vm1", "--endpoint", dst.name).returncode == 0
    none_yet = cli("vm", "replicate", "vm3", "--endpoint", dst.name, "--json")  # no snapshot yet: nothing to do
    assert none_yet.returncode == 0 and json.loads(none_yet.stdout)["action"] == "nothing", none_yet.stderr
    files = _error_files(worker)
    assert list(files) == [f"ERROR_to_{dst.name}"]
    assert files[f"ERROR_to_{dst.name}"].startswith(f"{vm2}: ") and "diverged" in files[f"ERROR_to_{dst.name}"]
    assert files[f"ERROR_to_{dst.name}"].count("\n") == 1  # vm2's line only


def test_a_lost_lease_in_replicate_all_stops_that_dataset_only(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, vms=("vm1", "vm2"),
                                             HOSTER_LOCK_LEASE_SECONDS=3, HOSTER_RETRY_MAX=0)
    vm1, vm2 = psrc.ds(f"{VMS_ROOT}/vm1"), psrc.ds(f"{VMS_ROOT}/vm2")
    hz.write_random(vm1, 8)
    for name in ("vm1", "vm2"):
        cli("snapshot", "new", name)
    client = redis_lib.Redis.from_url(redis_server.url)

    def steal() -> None:  # as if vm1's lease had expired and another job took its lock
        _wait_for_lock(client, src.name, vm1)
        time.sleep(1.5)
        client.set(keys.dataset_lock(src.name, vm1), "intruder", px=4000)

    thief = threading.Thread(target=steal)
    thief.start()
    res = cli("vm", "replicate-all", "--endpoint", dst.name, "--speed-limit", "2", timeout=240)
    thief.join()
    assert res.returncode == 1
    assert "lost the lock" in res.stderr or "lock was lost" in res.stderr
    assert guids(pdst.ds(f"{VMS_ROOT}/vm2")) == guids(vm2)  # the next dataset of the run went on
    assert list(_error_files(worker)[f"ERROR_to_{dst.name}"].splitlines())[0].startswith(f"{vm1}: ")


def test_a_copy_hoster_made_is_recognised_by_its_vm_config(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, vms=("vm1", "old"))
    old = psrc.ds(f"{VMS_ROOT}/old")
    # Hoster's own replication made this copy before hoster-tasks: no property, only its vm_config.json
    (hz.mount(old) / "vm_config.json").write_text(json.dumps({"parent_host": "hoster02", "cpu": "2"}, indent=3))
    cli("snapshot", "new", "vm1")
    refused = cli("snapshot", "new", "old")
    assert refused.returncode == 1 and "backup copy of node 'hoster02'" in refused.stderr, refused.stderr
    everything = json.loads(cli("vm", "replicate-all", "--endpoint", dst.name, "--json").stdout)
    assert [r["dataset"] for r in everything["results"]] == [psrc.ds(f"{VMS_ROOT}/vm1")]
    assert everything["skipped"] == [f"{old} (backup copy of hoster02)"]

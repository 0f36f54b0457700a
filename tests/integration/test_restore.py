"""`snapshot rollback` through the real parts: zfs-fuse, Redis, a real worker, the VM control adapter that
keeps VM states in a file (there is no bhyve here)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from harness import zfs as hz
from scenario import VMS_ROOT, make_vms, node_env, replicate_json, snapshot_names, two_nodes


def _digest(dataset: str) -> dict[str, str]:
    root = hz.mount(dataset)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _vm_states(path: Path, **vms: str) -> Path:
    path.write_text(json.dumps({"vms": vms, "calls": []}))
    return path


def _calls(path: Path) -> list[list[str]]:
    return list(json.loads(path.read_text())["calls"])


def _node(node_factory, pool_factory, worker_factory, tmp_path, running: bool = False):  # type: ignore[no-untyped-def]
    node, pool = node_factory("n1"), pool_factory()
    [vm] = make_vms(pool, "vm1")
    states = _vm_states(tmp_path / "vms.json", vm1="running" if running else "stopped")
    worker_factory(node, node_env(pool, HOSTER_VM_CONTROL="file", HOSTER_VM_STATE_FILE=str(states)))
    return vm, states


def _three_states(cli, vm: str) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    seen = []
    for i in range(3):
        hz.write_random(vm, 1, f"data-{i}.bin")
        assert cli("snapshot", "new", "vm1").returncode == 0
        seen.append(_digest(vm))
    return seen


def test_rollback_of_a_stopped_vm_destroys_exactly_the_newer_snapshots(
    node_factory, pool_factory, worker_factory, cli, tmp_path
):
    vm, states = _node(node_factory, pool_factory, worker_factory, tmp_path)
    seen = _three_states(cli, vm)
    first, *newer = snapshot_names(vm)
    hz.write_random(vm, 1, "unsnapshotted.bin")  # written after the newest snapshot: lost by a rollback

    res = cli("snapshot", "rollback", "vm1", first, "--yes", "--json")
    assert res.returncode == 0, res.stderr
    assert [line.strip() for line in res.stderr.splitlines()[1:]] == [f"{vm}@{n}" for n in newer]
    out = json.loads(res.stdout)
    assert out["destroys"] == newer and out["started"] is False and out["stopped"] is False
    assert snapshot_names(vm) == [first]
    assert _digest(vm) == seen[0]
    assert _calls(states) == []  # a stopped VM is neither stopped nor started


def test_rollback_refuses_a_running_vm_without_force_stop(node_factory, pool_factory, worker_factory, cli, tmp_path):
    vm, states = _node(node_factory, pool_factory, worker_factory, tmp_path, running=True)
    _three_states(cli, vm)
    before = snapshot_names(vm)
    res = cli("snapshot", "rollback", "vm1", before[0], "--yes")
    assert res.returncode == 1 and "is running" in res.stderr and "--force-stop" in res.stderr
    assert snapshot_names(vm) == before and _calls(states) == []


def test_force_stop_and_force_start_round_trip(node_factory, pool_factory, worker_factory, cli, tmp_path):
    vm, states = _node(node_factory, pool_factory, worker_factory, tmp_path, running=True)
    seen = _three_states(cli, vm)
    res = cli("snapshot", "rollback", "vm1", snapshot_names(vm)[1], "--force-stop", "--force-start", "--yes")
    assert res.returncode == 0, res.stderr
    assert _calls(states) == [["stop", "vm1"], ["start", "vm1"]]
    assert json.loads(states.read_text())["vms"]["vm1"] == "running"
    assert _digest(vm) == seen[1]


def test_a_failed_rollback_after_the_stop_still_starts_the_vm(
    node_factory, pool_factory, worker_factory, cli, tmp_path
):
    vm, states = _node(node_factory, pool_factory, worker_factory, tmp_path, running=True)
    _three_states(cli, vm)
    first, middle, newest = snapshot_names(vm)
    subprocess.run(["zfs", "hold", "operator", f"{vm}@{newest}"], check=True)  # zfs cannot destroy it now
    res = cli("snapshot", "rollback", "vm1", first, "--force-stop", "--force-start", "--yes")
    assert res.returncode == 1 and "cannot destroy" in res.stderr  # zfs-fuse: "dataset is busy"
    assert _calls(states) == [["stop", "vm1"], ["start", "vm1"]]  # never left down
    assert newest in snapshot_names(vm)
    subprocess.run(["zfs", "release", "operator", f"{vm}@{newest}"], check=True)


def test_keep_newer_keeps_the_state_rolled_away_from(node_factory, pool_factory, worker_factory, cli, tmp_path):
    vm, _ = _node(node_factory, pool_factory, worker_factory, tmp_path)
    seen = _three_states(cli, vm)
    hz.write_random(vm, 1, "unsnapshotted.bin")
    now = _digest(vm)
    res = cli("snapshot", "rollback", "vm1", snapshot_names(vm)[0], "--keep-newer", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    kept = json.loads(res.stdout)["kept_as"]
    assert kept.startswith(f"{vm}-kept-") and hz.exists(kept)
    assert _digest(vm) == seen[0]
    assert _digest(kept) == now  # everything after the rollback point, the unsnapshotted write included


def test_a_replication_base_is_not_destroyed_without_destroy_base(
    node_factory, pool_factory, worker_factory, cli, tmp_path
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory,
                                        HOSTER_VM_CONTROL="file",
                                        HOSTER_VM_STATE_FILE=str(_vm_states(tmp_path / "vms.json")))
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    _three_states(cli, vm)
    replicate_json(cli, "vm1", dst.name)
    before = snapshot_names(vm)
    res = cli("snapshot", "rollback", "vm1", before[0], "--yes")
    assert res.returncode == 1 and "replication base" in res.stderr and "--destroy-base" in res.stderr
    assert snapshot_names(vm) == before
    done = cli("snapshot", "rollback", "vm1", before[0], "--yes", "--destroy-base", "--json")
    assert done.returncode == 0, done.stderr
    again = cli("vm", "replicate", "vm1", "--endpoint", dst.name)  # says clearly why it cannot, and what to do
    assert again.returncode == 1 and "diverged" in again.stderr and "--discard-diverged" in again.stderr
    onward = replicate_json(cli, "vm1", dst.name, "--discard-diverged")  # the copy follows the rollback
    assert onward["settled"]["discarded"] == before[1:]
    assert snapshot_names(pdst.ds(f"{VMS_ROOT}/vm1")) == snapshot_names(vm)


def test_a_dry_run_changes_nothing_and_a_changed_list_is_refused(
    node_factory, pool_factory, worker_factory, cli, tmp_path, app
):
    vm, _ = _node(node_factory, pool_factory, worker_factory, tmp_path)
    _three_states(cli, vm)
    first = snapshot_names(vm)[0]
    queue = "hoster.node.n1"
    plan: dict[str, Any] = app.send_task("hoster.snapshot.rollback", args=["vm1", first],
                                         kwargs={"dry_run": True}, queue=queue).get(timeout=60)
    assert plan["destroys"] == snapshot_names(vm)[1:]
    cli("snapshot", "new", "vm1")  # one more appears after the user saw the list
    res = app.send_task("hoster.snapshot.rollback", args=["vm1", first],
                        kwargs={"expect_destroyed": plan["destroys"]}, queue=queue)
    res.get(timeout=60, propagate=False)
    assert res.state == "FAILURE" and "changed since they were shown" in str(res.result)
    assert len(snapshot_names(vm)) == 4

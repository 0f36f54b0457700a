"""Failover through the real parts: the parent is lost, the copy becomes the VM, the old parent comes back."""

from __future__ import annotations

import hashlib
import json
import subprocess

import redis as redis_lib
from harness import zfs as hz
from harness.proc import wait_until
from scenario import VMS_ROOT, guids, node_env, replicate_json, snapshot_names, two_nodes

from hoster_tasks import keys
from hoster_tasks.zfs.ops import PARENT_PROPERTY


def _digest(dataset: str) -> dict[str, str]:
    root = hz.mount(dataset)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _both_nodes(node_factory, pool_factory, worker_factory, tmp_path, vms=("vm1",), **states: str):  # type: ignore[no-untyped-def]
    """A parent `src` and a node `dst` with its copies, each with a worker; `dst` can replicate back. VM
    states (running or not) are kept in a file both workers share: one VM runs in one place."""
    path = tmp_path / "vms.json"
    path.write_text(json.dumps({"vms": states}))
    control = {"HOSTER_VM_CONTROL": "file", "HOSTER_VM_STATE_FILE": str(path)}
    src, dst, psrc, pdst, parent = two_nodes(node_factory, pool_factory, worker_factory, vms=vms, **control)
    back = src.endpoint(root_map={pdst.ds(VMS_ROOT): psrc.ds(VMS_ROOT)}, connect_timeout=3, keepalive_seconds=1)
    worker_factory(dst, node_env(pdst, HOSTER_TARGETS=[back], **control))
    return src, dst, psrc, pdst, parent, path


def test_failover_then_the_old_parent_comes_back_and_is_fenced(
    node_factory, pool_factory, worker_factory, cli, redis_server, tmp_path
):
    src, dst, psrc, pdst, old_worker, states = _both_nodes(node_factory, pool_factory, worker_factory, tmp_path,
                                                           vm1="stopped")
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 2)
    (hz.mount(vm) / "vm_config.json").write_text(json.dumps({"parent_host": "src", "cpu": "2"}, indent=3))
    cli("snapshot", "new", "vm1")
    replicate_json(cli, "vm1", dst.name)

    # the parent is lost: its worker gone, its link cut
    old_worker.stop()
    src.link_down()
    client = redis_lib.Redis.from_url(redis_server.url)
    wait_until(lambda: not client.exists(keys.node(src.name)), 30, "the old parent to drop out of the registry")

    moved = cli("vm", "change-parent", "vm1", "--node", dst.name, "--start", "--cireset", "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["previous"] == src.name
    assert json.loads(states.read_text())["calls"] == [["cireset", "vm1"], ["start", "vm1"]]
    assert hz.get_property(copy, PARENT_PROPERTY) == dst.name and hz.get_property(copy, "readonly") == "off"
    assert json.loads((hz.mount(copy) / "vm_config.json").read_text())["parent_host"] == dst.name
    assert json.loads(states.read_text())["vms"]["vm1"] == "running"
    hz.write_random(copy, 1, "written-on-the-new-parent.bin")  # the VM runs on the new parent now
    assert cli("snapshot", "new", "vm1").returncode == 0  # routed to the new parent
    on_new_parent = (guids(copy), _digest(copy))

    # the old parent comes back, with its stale copy and its schedule
    src.link_up()
    worker_factory(src, old_worker.env)
    snap_all = json.loads(cli("snapshot", "all", "--stype", "hourly", "--keep", "3", "--node", src.name,
                              "--json").stdout.split("\n", 1)[1])
    assert snap_all["taken"] == [] and "taken over by node dst" in snap_all["superseded"][0]
    pushed = json.loads(cli("vm", "replicate-all", "--endpoint", dst.name, "--node", src.name, "--json").stdout)
    assert pushed["results"] == [] and "taken over by node dst" in pushed["superseded"][0]
    assert (guids(copy), _digest(copy)) == on_new_parent  # nothing on the new parent was touched
    assert len(snapshot_names(vm)) == 1

    # the new direction: the old parent's dataset becomes the copy, incrementally
    way_back = replicate_json(cli, "vm1", src.name)
    assert way_back["action"] == "incremental"
    assert guids(vm) == guids(copy)
    assert hz.get_property(vm, PARENT_PROPERTY) == dst.name
    # set on the dataset: its current (read-write) mount shows "off, temporary" until it is unmounted
    subprocess.run(["zfs", "umount", vm], check=True)
    assert hz.get_property(vm, "readonly") == "on"


def test_the_way_back_when_the_old_parent_ran_on_after_the_last_sync(
    node_factory, pool_factory, worker_factory, cli, redis_server, tmp_path
):
    src, dst, psrc, pdst, old_worker, _ = _both_nodes(node_factory, pool_factory, worker_factory, tmp_path,
                                                      vms=("keep", "drop"))
    for name in ("keep", "drop"):
        hz.write_random(psrc.ds(f"{VMS_ROOT}/{name}"), 1)
        cli("snapshot", "new", name)
        replicate_json(cli, name, dst.name)
    old_worker.stop()
    src.link_down()
    ran_on = {}
    for name in ("keep", "drop"):  # cut off, the old parent ran on: new data and a snapshot of its own
        ds = psrc.ds(f"{VMS_ROOT}/{name}")
        hz.write_random(ds, 1, "after-the-last-sync.bin")
        hz.snapshot(ds, "hourly_2099-01-01_00-33-00")
        ran_on[name] = _digest(ds)
    client = redis_lib.Redis.from_url(redis_server.url)
    wait_until(lambda: not client.exists(keys.node(src.name)), 30, "the old parent to drop out of the registry")
    for name in ("keep", "drop"):
        assert cli("vm", "change-parent", name, "--node", dst.name).returncode == 0
        hz.write_random(pdst.ds(f"{VMS_ROOT}/{name}"), 1, "on-the-new-parent.bin")
        cli("snapshot", "new", name)
    src.link_up()
    worker_factory(src, old_worker.env)

    refused = cli("vm", "replicate", "keep", "--endpoint", src.name)
    assert refused.returncode == 1 and "--discard-diverged" in refused.stderr and "--keep-diverged" in refused.stderr
    assert _digest(psrc.ds(f"{VMS_ROOT}/keep")) == ran_on["keep"]  # nothing silently rolled back

    # zfs-fuse cannot rename a dataset mounted in another mount namespace (this test's): unmount it here, as
    # a stopped VM's dataset is on a real node
    subprocess.run(["zfs", "umount", psrc.ds(f"{VMS_ROOT}/keep")], check=True)
    kept = replicate_json(cli, "keep", src.name, "--keep-diverged")
    aside = kept["settled"]["kept_as"]
    assert aside.startswith(psrc.ds(f"{VMS_ROOT}/keep-diverged-")) and _digest(aside) == ran_on["keep"]
    assert guids(psrc.ds(f"{VMS_ROOT}/keep")) == guids(pdst.ds(f"{VMS_ROOT}/keep")) and kept["action"] == "full"

    dropped = replicate_json(cli, "drop", src.name, "--discard-diverged")
    assert dropped["settled"]["discarded"] == ["hourly_2099-01-01_00-33-00"]
    assert dropped["action"] == "incremental"
    assert guids(psrc.ds(f"{VMS_ROOT}/drop")) == guids(pdst.ds(f"{VMS_ROOT}/drop"))


def test_a_planned_move_loses_nothing(node_factory, pool_factory, worker_factory, cli, tmp_path):
    src, dst, psrc, pdst, _, states = _both_nodes(node_factory, pool_factory, worker_factory, tmp_path, vm1="running")
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 2)
    cli("snapshot", "new", "vm1")
    replicate_json(cli, "vm1", dst.name)
    hz.write_random(vm, 1, "written-just-before-the-move.bin")  # not in any snapshot yet
    last = _digest(vm)

    moved = cli("vm", "move", "vm1", "--to", dst.name, "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["parent"] == dst.name
    assert [c[0] for c in json.loads(states.read_text())["calls"]] == ["stop", "start"]
    assert _digest(copy) == last and guids(copy) == guids(vm)
    assert hz.get_property(copy, PARENT_PROPERTY) == dst.name and hz.get_property(copy, "readonly") == "off"
    assert hz.get_property(vm, PARENT_PROPERTY) == dst.name  # the old parent's dataset is now the copy
    hz.write_random(copy, 1, "on-the-new-parent.bin")
    assert cli("snapshot", "new", "vm1").returncode == 0  # routed to the new parent at once (its registry entry)
    assert replicate_json(cli, "vm1", src.name)["action"] == "incremental"  # the new direction, at once

"""A target with its own keep policy, and `vm replicate-all --filter / --script-name`, through the real parts:
two namespaced nodes with sshd, a worker on the source, zfs-fuse, the real CLI.
"""

from __future__ import annotations

import json
import subprocess

from harness import zfs as hz
from harness.proc import wait_until
from scenario import VMS_ROOT, guids, replicate_json, two_nodes

from hoster_tasks.names import parse_snapshot_name
from hoster_tasks.zfs.ops import base_property


def _of_type(dataset: str, stype: str) -> list[str]:
    """Short names of `dataset`'s snapshots of this system's type `stype`, oldest first."""
    out = []
    for name in guids(dataset):
        parsed = parse_snapshot_name(name)
        if parsed is not None and parsed.stype == stype:
            out.append(name)
    return out


def _snapshot_all(cli, stype: str, keep: int) -> None:  # type: ignore[no-untyped-def]
    res = cli("snapshot", "all", "--stype", stype, "--keep", str(keep))
    assert res.returncode == 0, res.stderr


def _keep_two_hourly_with_history(node_factory, pool_factory, worker_factory, cli):  # type: ignore[no-untyped-def]
    """A target that keeps 2 hourly; the source holds 2 daily and 4 hourly of vm1. Returns (dst, vm, copy)."""
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, keep={"hourly": 2})
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 1)
    _snapshot_all(cli, "daily", 2)
    for _ in range(4):
        _snapshot_all(cli, "hourly", 4)
    return dst, vm, pdst.ds(f"{VMS_ROOT}/vm1")


def test_target_keep_policy_prunes_the_target_only(node_factory, pool_factory, worker_factory, cli):
    dst, vm, copy = _keep_two_hourly_with_history(node_factory, pool_factory, worker_factory, cli)
    src_hourly = _of_type(vm, "hourly")
    assert len(src_hourly) == 4

    out = replicate_json(cli, "vm1", dst.name)
    assert out["action"] == "full"

    # the source keeps its 4 hourly; the target keeps only the newest 2 of them
    assert _of_type(vm, "hourly") == src_hourly
    assert _of_type(copy, "hourly") == src_hourly[-2:]
    assert sorted(out["pruned_on_target"]) == sorted(f"{copy}@{n}" for n in src_hourly[:2])
    # the other types are mirrored: the daily is on both sides
    assert _of_type(copy, "daily") == _of_type(vm, "daily") and len(_of_type(vm, "daily")) == 1
    # what is left on the target is exactly the source's snapshots, GUID for GUID
    assert set(guids(copy).items()) <= set(guids(vm).items())
    # the common base is the newest snapshot: recorded on the source, present on both sides
    base = list(guids(vm))[-1]
    assert base in guids(copy)
    assert hz.get_property(vm, base_property(dst.name)) == str(guids(vm)[base])


def test_target_keep_mirrors_other_types_and_never_prunes_the_base(
    node_factory, pool_factory, worker_factory, cli
):
    """Second run: the source pruned a daily (mirrored on the target); the target keeps exactly its 2 newest
    hourly (the old base, released this run, goes too); the new common base stays on both sides."""
    dst, vm, copy = _keep_two_hourly_with_history(node_factory, pool_factory, worker_factory, cli)
    replicate_json(cli, "vm1", dst.name)
    first_daily = _of_type(vm, "daily")[0]

    for _ in range(2):
        _snapshot_all(cli, "daily", 2)  # the source drops its first daily
    for _ in range(2):
        _snapshot_all(cli, "hourly", 4)
    assert first_daily not in guids(vm)
    src_hourly = _of_type(vm, "hourly")
    assert len(src_hourly) == 4

    out = replicate_json(cli, "vm1", dst.name)
    assert out["action"] == "incremental"
    base = list(guids(vm))[-1]
    assert out["base"] == f"{vm}@{base}"
    assert base in guids(copy)  # the new common base is never pruned
    assert hz.get_property(vm, base_property(dst.name)) == str(guids(vm)[base])
    assert _of_type(vm, "hourly") == src_hourly  # the target's policy never touches the source
    # daily: mirrored (the source's pruned one is gone from the target as well)
    assert _of_type(copy, "daily") == _of_type(vm, "daily") and len(_of_type(copy, "daily")) == 2
    assert first_daily not in guids(copy)
    # hourly: exactly the newest 2 (the old base whose hold this very run released is pruned too)
    assert _of_type(copy, "hourly") == src_hourly[-2:]
    assert set(guids(copy).items()) <= set(guids(vm).items())


def test_target_keep_drops_the_released_old_base_in_the_same_run(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(
        node_factory, pool_factory, worker_factory, keep={"hourly": 2}
    )
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    for _ in range(4):
        _snapshot_all(cli, "hourly", 4)
    replicate_json(cli, "vm1", dst.name)
    for _ in range(2):
        _snapshot_all(cli, "hourly", 4)
    replicate_json(cli, "vm1", dst.name)
    assert _of_type(copy, "hourly") == _of_type(vm, "hourly")[-2:]


def test_replicate_all_filter_replicates_only_the_named_vm(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, vms=("vm1", "vm2"))
    for name in ("vm1", "vm2"):
        hz.write_random(psrc.ds(f"{VMS_ROOT}/{name}"), 1)
    _snapshot_all(cli, "hourly", 3)

    res = cli("vm", "replicate-all", "--endpoint", dst.name, "--filter", "vm1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["dataset"] for r in out["results"]] == [psrc.ds(f"{VMS_ROOT}/vm1")]
    assert out["results"][0]["action"] == "full" and out["failed"] == []
    assert guids(pdst.ds(f"{VMS_ROOT}/vm1")) == guids(psrc.ds(f"{VMS_ROOT}/vm1"))
    assert not hz.exists(pdst.ds(f"{VMS_ROOT}/vm2"))


def test_replicate_all_script_name_names_the_error_file(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    copy = pdst.create_dataset(f"{VMS_ROOT}/vm1")  # an unrelated dataset sits where the copy goes
    hz.snapshot(copy, "theirs")
    hz.write_random(vm, 1)
    _snapshot_all(cli, "hourly", 3)
    errors = worker.log_path.parent / "errors"

    failed = cli("vm", "replicate-all", "--endpoint", dst.name, "--script-name", "nightly")
    assert failed.returncode == 1
    assert "no snapshot in common" in failed.stderr
    assert sorted(p.name for p in errors.glob("ERROR_*")) == ["ERROR_nightly"]
    assert vm in (errors / "ERROR_nightly").read_text()
    assert list(guids(copy)) == ["theirs"]  # refused, untouched

    # the operator clears the way (zfs-fuse may call a just-unmounted dataset busy for a moment)
    wait_until(lambda: subprocess.run(["zfs", "destroy", "-r", copy], capture_output=True).returncode == 0,
               timeout=30, what=f"zfs destroy -r {copy}", interval=0.5)
    ok = cli("vm", "replicate-all", "--endpoint", dst.name, "--script-name", "nightly", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["action"] == "full"
    assert list(errors.glob("ERROR_*")) == []
    assert guids(copy) == guids(vm)

"""The target's capability probe and the target's pruning, through the real parts: two namespaced nodes with
sshd, a worker on the source, zfs-fuse, the real CLI."""

from __future__ import annotations

import json

from harness import zfs as hz
from harness.proc import run
from scenario import VMS_ROOT, guids, make_vms, node_env, replicate_json, snapshot_names, two_nodes

FAST = {"keepalive_seconds": 1, "connect_timeout": 3}


def _snapshot_all(cli, stype: str, keep: int) -> None:  # type: ignore[no-untyped-def]
    res = cli("snapshot", "all", "--stype", stype, "--keep", str(keep))
    assert res.returncode == 0, res.stderr


def test_a_probe_of_an_unreachable_target_fails_loudly_and_the_next_run_probes_again(
    node_factory, pool_factory, worker_factory, cli
):
    """One worker process (-c 1) keeps probed capabilities per endpoint: a probe that failed must not be
    kept as "nothing supported" (here that would mean no holds on the copy)."""
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    pdst.create_dataset(VMS_ROOT)
    (vm,) = make_vms(psrc, "vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    target = dst.endpoint(root_map={psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}, **FAST)
    worker_factory(src, node_env(psrc, HOSTER_TARGETS=[target], HOSTER_RETRY_MAX=0), args=["-c", "1"])
    hz.write_random(vm, 1)
    _snapshot_all(cli, "hourly", 3)

    # replicate-all lists the source, then the target, whose first command is the probe
    dst.link_down()
    try:
        failed = cli("vm", "replicate-all", "--endpoint", dst.name)
    finally:
        dst.link_up()
    assert failed.returncode == 1
    # the probe (`zfs` alone, on dst) is what failed, and it says why: not "nothing supported"
    assert "[dst] zfs exited 255: ssh" in failed.stderr, failed.stderr
    assert not hz.exists(copy)

    res = cli("vm", "replicate-all", "--endpoint", dst.name, "--json")
    assert res.returncode == 0, res.stderr
    assert [r["action"] for r in json.loads(res.stdout)["results"]] == ["full"]
    assert guids(copy) == guids(vm)
    base = snapshot_names(vm)[-1]
    assert hz.get_property(f"{copy}@{base}", "userrefs") == "1"  # held: the second run probed zfs-fuse for real


def test_target_pruning_spares_held_and_busy_snapshots_and_prunes_the_rest(
    node_factory, pool_factory, worker_factory, cli
):
    """The target keeps 2 hourly. On the copy an operator holds one snapshot and has cloned another (to
    restore a file, say); zfs-fuse cannot list clones, so the clone's origin is only known to be busy when its
    destroy is refused. Both are spared, the run succeeds, and the other excess snapshot still goes."""
    _, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, keep={"hourly": 2})
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 1)
    for _ in range(3):
        _snapshot_all(cli, "hourly", 10)
    replicate_json(cli, "vm1", dst.name)
    h1, h2, h3 = snapshot_names(vm)
    assert snapshot_names(copy) == [h2, h3]  # h3 is the base (held by us until the next run moves it)

    run(["zfs", "hold", "operator", f"{copy}@{h2}"])
    run(["zfs", "clone", "-o", "mountpoint=none", f"{copy}@{h3}", pdst.ds("restore")])
    for _ in range(3):
        _snapshot_all(cli, "hourly", 10)
    h4, h5, h6 = snapshot_names(vm)[3:]

    out = replicate_json(cli, "vm1", dst.name)

    assert out["action"] == "incremental" and out["base"] == f"{vm}@{h6}"
    assert out["pruned_on_target"] == [f"{copy}@{h4}"]
    assert snapshot_names(copy) == [h2, h3, h5, h6]  # h2 held, h3 the clone's origin: spared
    assert snapshot_names(vm) == [h1, h2, h3, h4, h5, h6]  # the target's policy never touches the source

"""Scenario helpers shared by the integration tests: VM datasets, worker settings, snapshot names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import Pool
from harness import zfs as hz

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VMS_ROOT = "vm"  # each test pool holds its VMs under <pool>/vm, like zroot/vm-encrypted


def make_vms(pool: Pool, *names: str) -> list[str]:
    pool.create_dataset(VMS_ROOT)
    return [pool.create_dataset(f"{VMS_ROOT}/{n}") for n in names]


def node_env(pool: Pool, **extra: Any) -> dict[str, Any]:
    """Worker settings for a node holding VMs under <pool>/vm; short waits keep tests fast."""
    env: dict[str, Any] = {
        "HOSTER_DATASETS": [pool.ds(VMS_ROOT)],
        "HOSTER_HEARTBEAT_SECONDS": 1,
        "HOSTER_LOCK_WAIT_SECONDS": 2,
        "HOSTER_LOCK_LEASE_SECONDS": 10,
    }
    env.update(extra)
    return env


def snapshot_names(dataset: str) -> list[str]:
    return [s.short for s in hz.snapshots(dataset)]


def two_nodes(  # type: ignore[no-untyped-def]
    node_factory, pool_factory, worker_factory, vms=("vm1",), keep=None, broken_target=False, worker_args=(),
    **src_env: Any
):
    """A source node holding `vms` under <src pool>/vm and a target node whose copies go to <dst pool>/vm.

    `keep`: the endpoint's own retention policy for the target. `broken_target`: a second endpoint `broken`
    on the same node whose root is missing there, so every `zfs receive` into it fails (a Permanent error).
    The VMs exist before the worker starts, so its first heartbeat already registers them. `worker_args`: the
    worker's own arguments (e.g. ["-c", "1"]).
    """
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    pdst.create_dataset(VMS_ROOT)
    make_vms(psrc, *vms)
    fast = {"keepalive_seconds": 1, "connect_timeout": 3}
    targets = [dst.endpoint(root_map={psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}, keep=keep or {}, **fast)]
    if broken_target:
        targets.append(dst.endpoint(name="broken", root_map={psrc.ds(VMS_ROOT): pdst.ds("missing/vm")}, **fast))
    env = node_env(psrc, HOSTER_TARGETS=targets, HOSTER_RETRY_MAX=8, HOSTER_RETRY_BACKOFF_MAX_SECONDS=4)
    env.update(src_env)
    worker = worker_factory(src, env, args=worker_args)
    return src, dst, psrc, pdst, worker


def replicate_json(cli, vm: str, endpoint: str, *extra: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """`vm replicate --json`, which must succeed; its result."""
    res = cli("vm", "replicate", vm, "--endpoint", endpoint, "--json", *extra)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def guids(dataset: str) -> dict[str, int]:
    """{short snapshot name: guid}."""
    return {s.short: s.guid for s in hz.snapshots(dataset)}

"""The OpenZFS guest as a fixture: real OpenZFS 2.3, a real worker in it, the CLI on the host driving a
snapshot and a replication from one guest pool to another through the guest's sshd."""

from __future__ import annotations

import json
import time
from typing import Any

from harness.openzfs import Guest, GuestPool, endpoint

VMS_ROOT = "vm"
TARGET = "ozfs-target"


def guids(guest: Guest, dataset: str) -> dict[str, str]:
    """{short snapshot name: guid} on real OpenZFS (`list -p`)."""
    out = guest.zfs("list", "-H", "-p", "-t", "snapshot", "-o", "name,guid", "-s", "createtxg", "-d", "1", dataset)
    return {name.split("@", 1)[1]: guid for name, guid in (line.split("\t") for line in out.splitlines())}


def node_env(src: GuestPool, dst: GuestPool, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "HOSTER_DATASETS": [src.ds(VMS_ROOT)],
        "HOSTER_TARGETS": [endpoint(TARGET, {src.ds(VMS_ROOT): dst.ds(VMS_ROOT)}, keepalive_seconds=2)],
        "HOSTER_HEARTBEAT_SECONDS": 1,
        "HOSTER_LOCK_WAIT_SECONDS": 5,
        "HOSTER_LOCK_LEASE_SECONDS": 20,
    }
    env.update(extra)
    return env


def test_guest_runs_openzfs_2_3(ozfs_guest):
    user, kmod = ozfs_guest.versions()
    assert user.startswith("zfs-2.3."), user
    assert kmod.startswith("zfs-kmod-2.3."), kmod


def test_snapshot_and_replicate_between_guest_pools(ozfs_guest, ozfs_pools, ozfs_worker_factory, cli, redis_client):
    src, dst = ozfs_pools(), ozfs_pools()
    vm = src.create_dataset(f"{VMS_ROOT}/vm1")
    dst.create_dataset(VMS_ROOT)
    ozfs_guest.write_random(vm, 2)

    started = time.monotonic()
    worker = ozfs_worker_factory("ozfs-src", node_env(src, dst))
    print(f"guest worker ready after {time.monotonic() - started:.1f}s")
    assert worker.running

    res = cli("snapshot", "all", "--stype", "hourly", "--keep", "5", "--json")
    assert res.returncode == 0, res.stderr
    snaps = guids(ozfs_guest, vm)
    assert len(snaps) == 1 and next(iter(snaps)).startswith("hourly_"), snaps

    res = cli("vm", "replicate", "vm1", "--endpoint", TARGET, "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["action"] == "full", result
    copy = dst.ds(f"{VMS_ROOT}/vm1")
    assert guids(ozfs_guest, copy) == snaps  # the same snapshot (GUID) on the target's OpenZFS
    assert ozfs_guest.sha256_files(copy) == ozfs_guest.sha256_files(vm)
    assert worker.error_files() == []

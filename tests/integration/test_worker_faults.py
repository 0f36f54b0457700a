"""A worker that dies or freezes mid-transfer: no transfer goes on without its lock, and a receive still
running on the target is busy, never divergence. Real workers, zfs-fuse pools and sshd nodes.

Every node shares this machine's process table (network namespaces only), so a transfer's processes on both
sides are visible here in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from celery.result import AsyncResult
from harness import zfs as hz
from harness.proc import wait_until
from scenario import VMS_ROOT, guids, make_vms, node_env, two_nodes

from hoster_tasks import keys

LEASE = 4  # seconds: the watchdog looks every lease/3


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def _procs() -> list[Proc]:
    """Every live process (zombies left out: an orphan's zombie may linger where PID 1 does not reap)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state != "Z" and argv:
            found.append(Proc(int(entry.name), int(ppid), tuple(a.decode(errors="replace") for a in argv)))
    return found


def _running(pids: set[int]) -> set[int]:
    return pids & {p.pid for p in _procs()}


def _receives(copy: str) -> list[Proc]:
    """`zfs receive` processes writing into `copy` (on the target: the ssh client's argv is one string)."""
    return [p for p in _procs() if p.argv[:2] == ("zfs", "receive") and p.argv[-1] == copy]


def _transfer(vm: str, copy: str) -> set[int] | None:
    """Once the transfer streams: the pids of everything its worker process started for it (zfs send, pv,
    ssh, and whatever else) and of the target's receive. Not the lease watchdog: a worker process keeps it
    from one transfer to the next (hoster_tasks/replication/watchdog.py), it is what stops the others."""
    procs = _procs()
    send = next((p for p in procs if p.argv[:2] == ("zfs", "send")
                 and any(a == vm or a.startswith(f"{vm}@") for a in p.argv[2:])), None)
    receives = _receives(copy)
    if send is None or not receives:
        return None
    started = {p.pid for p in procs if p.ppid == send.ppid  # the stages are children of the task's process
               and "hoster_tasks.replication.watchdog" not in p.argv}
    assert any(p.argv[0] == "pv" for p in procs if p.pid in started)
    assert any(p.argv[0] == "ssh" for p in procs if p.pid in started)
    return started | {p.pid for p in receives}


def _watchdogs(transfer: set[int]) -> set[int]:
    """The lease watchdogs kept by the process that started `transfer`'s stages."""
    procs = _procs()
    parents = {p.ppid for p in procs if p.pid in transfer}
    return {p.pid for p in procs if p.ppid in parents and "hoster_tasks.replication.watchdog" in p.argv}


def _start_transfer(cli, vm: str, copy: str, endpoint: str, mib: int, speed: str) -> set[int]:  # type: ignore[no-untyped-def]
    hz.write_random(vm, mib)
    assert cli("snapshot", "new", "vm1").returncode == 0
    res = cli("vm", "replicate", "vm1", "--endpoint", endpoint, "--speed-limit", speed, "--no-wait")
    assert res.returncode == 0, res.stderr
    return wait_until(lambda: _transfer(vm, copy), 60, "the transfer to stream", interval=0.1,
                      on_timeout=lambda: "\n".join(str(p) for p in _procs() if "zfs" in " ".join(p.argv)))


def test_a_killed_worker_leaves_no_transfer_running(node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory,
                                             HOSTER_LOCK_LEASE_SECONDS=LEASE)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    transfer = _start_transfer(cli, vm, copy, dst.name, mib=20, speed="0.5")  # 40 s at 0.5 MB/s
    watchdogs = _watchdogs(transfer)
    assert watchdogs  # the transfer is guarded

    worker.kill()  # SIGKILL to its whole process group; the stages run in sessions of their own

    wait_until(lambda: not _running(transfer), 20, "the killed worker's transfer to end",
               on_timeout=lambda: f"still running: {[p for p in _procs() if p.pid in transfer]}")
    assert _receives(copy) == []
    # the kept watchdog (its own session too) dies with the worker process that kept it
    wait_until(lambda: not _running(watchdogs), 20, "the killed worker's watchdog to end")


def test_a_frozen_worker_s_transfer_is_stopped_once_its_lease_ran_out(
    node_factory, pool_factory, worker_factory, cli, redis_client
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory,
                                             HOSTER_LOCK_LEASE_SECONDS=LEASE)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    lock_keys = [keys.dataset_lock("src", vm), keys.dataset_lock(dst.name, copy)]
    transfer = _start_transfer(cli, vm, copy, dst.name, mib=20, speed="0.5")
    assert all(redis_client.exists(k) for k in lock_keys)

    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGSTOP)  # frozen: it renews nothing and stops nothing
    try:
        def stopped() -> bool:
            if _running(transfer):
                return False
            # looked at after the stages were found gone: a lock still held here means an early kill
            assert not any(redis_client.exists(k) for k in lock_keys), "killed while the lock was still held"
            return True

        wait_until(stopped, 30, "the frozen worker's transfer to be stopped", interval=0.1,
                   on_timeout=lambda: f"still running: {[p for p in _procs() if p.pid in transfer]}")
        assert _receives(copy) == []
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    # thawed, the worker reports the lost lock (a Transient error: retried)
    wait_until(lambda: "the watchdog stopped the transfer" in worker.log_path.read_text(), 30,
               "the worker to report the lost lease")
    assert "its lease expired while the worker was not renewing it" in worker.log_path.read_text()
    worker.kill()


BUSY = "has a zfs receive in progress; retrying later"


def _alarms(worker) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The worker's ERROR_ files and what they say."""
    return {p.name: p.read_text() for p in (worker.log_path.parent / "errors").glob("ERROR_*")}


def test_a_receive_in_progress_on_the_target_is_busy_not_diverged(
    node_factory, pool_factory, worker_factory, cli, app
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    vm, copy = psrc.ds(f"{VMS_ROOT}/vm1"), pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 4)
    assert cli("snapshot", "new", "vm1").returncode == 0
    snap = hz.snapshots(vm)[-1].name

    # another tool's receive into the copy, streaming slowly (4 MiB at 100 kB/s: it would take 40 s)
    send = subprocess.Popen(["zfs", "send", snap], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pv = subprocess.Popen(["pv", "-q", "-L", "100k"], stdin=send.stdout, stdout=subprocess.PIPE)
    assert send.stdout is not None and pv.stdout is not None
    send.stdout.close()
    ssh = subprocess.Popen(dst.ssh_argv("zfs", "receive", "-u", copy), stdin=pv.stdout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pv.stdout.close()
    foreign = [send, pv, ssh]
    try:
        wait_until(lambda: _receives(copy), 30, "the other receive to run", interval=0.1)
        task_id = cli("vm", "replicate", "vm1", "--endpoint", dst.name, "--no-wait").stdout.strip()
        wait_until(lambda: BUSY in worker.log_path.read_text() or _alarms(worker), 60,
                   "the replication to find the target busy (or to fail)")
        assert _alarms(worker) == {}  # busy is no alarm
        log = worker.log_path.read_text()
        assert BUSY in log and "Retry in" in log and "diverged" not in log
    finally:
        for proc in foreign:  # the other tool gives up: its receive ends
            proc.kill()
            proc.wait()

    result = AsyncResult(task_id, app=app).get(timeout=120)
    assert result["action"] == "full"
    assert guids(copy) == guids(vm)
    assert _alarms(worker) == {}


def test_a_stalled_link_is_stopped_by_the_stall_watchdog_and_retried(
    node_factory, pool_factory, worker_factory, cli, app
):
    """The transfer's ssh is frozen (SIGSTOP): the connection stays up, nothing flows, and the lock is
    renewed all along, so only the stall watchdog can notice. It stops the stages after stall_seconds; the
    step is retried and the data arrives (zfs-fuse has no resume token: the retry sends it again)."""
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    pdst.create_dataset(VMS_ROOT)
    (vm,) = make_vms(psrc, "vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    target = dst.endpoint(root_map={psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}, connect_timeout=3, stall_seconds=3)
    worker = worker_factory(src, node_env(psrc, HOSTER_TARGETS=[target], HOSTER_RETRY_MAX=8,
                                          HOSTER_RETRY_BACKOFF_MAX_SECONDS=2))
    transfer = _start_transfer(cli, vm, copy, dst.name, mib=4, speed="1")
    ssh = [p for p in _procs() if p.pid in transfer and p.argv[0] == "ssh"]
    assert len(ssh) == 1
    os.kill(ssh[0].pid, signal.SIGSTOP)

    wait_until(lambda: not _running(transfer), 30, "the stalled transfer to be stopped",
               on_timeout=lambda: f"still running: {[p for p in _procs() if p.pid in transfer]}")
    wait_until(lambda: guids(copy) == guids(vm) if hz.exists(copy) else False, 90, "the retry to land the copy")
    log = worker.log_path.read_text()
    assert "TransferStalled" in log and "no progress for 3 s" in log
    assert _alarms(worker) == {}

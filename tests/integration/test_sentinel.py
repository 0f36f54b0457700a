"""Redis Sentinel (hoster_tasks/redis_conn.py): workers, beat and the CLI on a `sentinel://` URL with a real
`redis-sentinel`, a master and a replica. The master is failed over while a replication and a snapshot run:
everyone reconnects on their own, no two receives into one dataset ever run at once, and the next runs
(a snapshot, a replication, beat's next slot) succeed."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from beats import BeatProcess
from harness import zfs as hz
from harness.proc import HarnessError, wait_until
from harness.sentinel import SentinelSetup, sentinel_binary
from scenario import VMS_ROOT, make_vms, node_env

from hoster_tasks import keys
from hoster_tasks.names import parse_snapshot_name
from hoster_tasks.redis_conn import client_from_url

SLOW_SNAPSHOT = """#!/bin/sh
[ "$1" = snapshot ] && sleep 4
exec zfs "$@"
"""


@pytest.fixture
def sentinel(test_network, tmp_path: Path) -> Iterator[SentinelSetup]:  # type: ignore[no-untyped-def]
    if sentinel_binary() is None:
        pytest.fail("redis-sentinel is not installed (scripts/bootstrap.sh installs it)", pytrace=False)
    setup = SentinelSetup(tmp_path / "sentinel", bind=("127.0.0.1", test_network.gateway))
    try:
        yield setup.start()
    finally:
        setup.stop()


class ReceiveWatch:
    """Counts `zfs receive` processes into one dataset, every 50 ms, from a thread."""

    def __init__(self, copy: str) -> None:
        self.copy = copy
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            # anchored: the zfs process itself, not the ssh client whose argv carries the same words
            ps = subprocess.run(["pgrep", "-f", f"^zfs receive -u {self.copy}$"], capture_output=True, text=True)
            self.counts.append(len(ps.stdout.split()))
            time.sleep(0.05)

    def __enter__(self) -> ReceiveWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _meta(client: Any, task_id: str) -> dict[str, Any]:
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else {}


def _registered_on_master(url: str, node: str) -> bool:
    """Asked the way a new CLI process asks: through the sentinels, on a fresh connection. A client connected
    before the failover still reads the old master, which serves its own stale registry until it is demoted
    and has loaded the new master's data."""
    fresh = client_from_url(url, socket_timeout=5)
    try:
        return bool(fresh.exists(keys.node(node)))
    except Exception:  # noqa: BLE001 - the master is switching: ask again
        return False
    finally:
        fresh.close()


def _status(client: Any, task_id: str) -> str:
    try:
        return str(_meta(client, task_id).get("status", "PENDING"))
    except Exception:  # noqa: BLE001 - the master is switching: ask again
        return "UNKNOWN"


def _slots(dataset: str) -> list[datetime]:
    names = [parse_snapshot_name(s.short) for s in hz.snapshots(dataset)]
    return sorted(n.taken_at for n in names if n is not None and n.stype == "frequent")


def test_failover_while_a_replication_and_a_snapshot_run(
    sentinel, node_factory, pool_factory, worker_factory, cli, tmp_path
):
    url = sentinel.url
    client = client_from_url(url, decode_responses=True, socket_timeout=5)
    slow = tmp_path / "slow-zfs"
    slow.write_text(SLOW_SNAPSHOT)
    slow.chmod(0o755)

    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    pdst.create_dataset(VMS_ROOT)
    (vm,) = make_vms(psrc, "vm1")
    copy = pdst.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 10)
    target = dst.endpoint(root_map={psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}, keepalive_seconds=1, connect_timeout=3)
    env = node_env(psrc, HOSTER_REDIS_URL=url, HOSTER_TARGETS=[target], HOSTER_RETRY_MAX=8,
                   HOSTER_RETRY_BACKOFF_MAX_SECONDS=4, HOSTER_ZFS_COMMAND=str(slow))
    worker = worker_factory(src, env, wait=False)
    wait_until(lambda: client.exists(keys.node("src")), 60, "the worker to register through the sentinel",
               on_timeout=worker.log_tail)
    beat = BeatProcess(tmp_path / "beat", url)
    cli_env = {"HOSTER_REDIS_URL": url}
    try:
        first = cli("snapshot", "new", "vm1", env=cli_env)
        assert first.returncode == 0, first.stderr

        with ReceiveWatch(copy) as receives:
            rep_id = cli("vm", "replicate", "vm1", "--endpoint", "dst", "--speed-limit", "1", "--no-wait",
                         env=cli_env).stdout.strip()
            wait_until(lambda: any(receives.counts[-3:]), 60, "the replication's receive to run",
                       on_timeout=worker.log_tail)
            snap_id = cli("snapshot", "new", "vm1", "--no-wait", env=cli_env).stdout.strip()
            wait_until(lambda: _status(client, snap_id) == "STARTED", 30, "the snapshot job to start")

            old_master = sentinel.current_master()
            failed_over_at = datetime.now(UTC)
            new_master = sentinel.failover()
            assert new_master != old_master

            # both jobs end on their own, their results stored on the new master
            wait_until(lambda: _status(client, snap_id) in ("SUCCESS", "FAILURE"), 90, "the snapshot job to end",
                       on_timeout=worker.log_tail)
            wait_until(lambda: _status(client, rep_id) in ("SUCCESS", "FAILURE"), 180, "the replication to end",
                       on_timeout=worker.log_tail)
        assert max(receives.counts) == 1  # never two receives into the copy at once, across the failover
        # Either outcome is allowed for the jobs in flight: until the sentinel turns the old master into a
        # replica (its next INFO round, ~10 s), clients still connected to it write there, and those writes
        # are lost; a job lease renewed there lapses on the new master and the job is reported lost and
        # re-queued (README, "Redis Sentinel"). What must hold: no two receives at once (above), and:
        snap, rep = _meta(client, snap_id), _meta(client, rep_id)

        # the next runs succeed: a snapshot, a replication that sends it, and beat's next slot. (A registry
        # entry written to the old master in its last seconds is lost with it: the next heartbeat restores it.)
        wait_until(lambda: _registered_on_master(url, "src"), 30, "the worker's heartbeat on the new master")
        after = cli("snapshot", "new", "vm1", env=cli_env)
        assert after.returncode == 0, after.stderr
        again = cli("vm", "replicate", "vm1", "--endpoint", "dst", "--json", env=cli_env, timeout=180)
        assert again.returncode == 0, f"{again.stderr}\nin flight: {snap} {rep}\n{worker.log_tail()}"
        assert {s.guid for s in hz.snapshots(vm)} <= {s.guid for s in hz.snapshots(copy)}
        wait_until(lambda: any(t > failed_over_at for t in _slots(vm)), 90, "beat to fire a slot after the failover",
                   on_timeout=beat.tail)
        assert "Acquired lock" in beat.log and beat.running
    except (AssertionError, HarnessError) as exc:
        raise AssertionError(f"{exc}\n{beat.tail()}\n{sentinel.log_tails()}") from None
    finally:
        beat.stop()

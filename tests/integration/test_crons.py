"""Sentry Crons tell the truth: a beat entry's check-in closes with the outcome of the node jobs its fan-out
started, after they ended, not when the fan-out returns (hoster_tasks/observability/crons.py).

Each test runs a real `hoster-tasks beat` on an overdue entry, real workers, and the local Sentry sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from harness import zfs as hz
from harness.proc import HarnessError, tail, wait_until
from scenario import VMS_ROOT, make_vms, node_env, snapshot_names, two_nodes

from hoster_tasks.locks import DatasetLock, LockSpec

TERMINAL = ("ok", "error")


def _age_schedule(redis_url: str, name: str, task: str) -> None:
    """Beat's schedule as a previous run leaves it in Redis (celery-redbeat), the entry last run 5 minutes
    ago: a fresh beat runs the overdue entry at once (its args and options come from the configured
    schedule; RedBeat keeps only last_run_at)."""
    from celery.schedules import crontab
    from redbeat.decoder import RedBeatJSONEncoder

    from hoster_tasks import keys

    definition = {"name": name, "task": task, "args": [], "kwargs": {}, "options": {}, "schedule": crontab(),
                  "enabled": True}
    meta = {"last_run_at": datetime.now(UTC) - timedelta(minutes=5)}
    with redis_lib.Redis.from_url(redis_url) as client:
        client.hset(f"{keys.BEAT_KEY_PREFIX}{name}", mapping={
            "definition": json.dumps(definition, cls=RedBeatJSONEncoder),
            "meta": json.dumps(meta, cls=RedBeatJSONEncoder),
        })


class Beat:
    """One real beat process, stopped as soon as the fan-out it dispatched has run (a second dispatch a
    minute later would only add noise)."""

    def __init__(self, sink: Any, app: Any, workdir: Path, env: dict[str, str]) -> None:
        self.sink = sink
        self.app = app
        self.log = workdir / "beat.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
        base.update({"HOSTER_NODE_NAME": "control", "HOSTER_SNAPSHOT_SCHEDULE": "{}", "PYTHONUNBUFFERED": "1"})
        base.update(env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "hoster_tasks", "beat"], cwd=workdir, env=base,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def dispatched(self, slug: str, fanout_task: str, node: str) -> tuple[str, Any]:
        """The check-in id of the entry's IN_PROGRESS (sent by beat as it dispatches the fan-out), and the
        AsyncResult of the job the fan-out sent to `node`."""
        try:
            item = self.sink.wait_for(lambda i: i.type == "check_in" and i.payload["monitor_slug"] == slug
                                      and i.payload["status"] == "in_progress", timeout=75)
            # beat sends the check-in before it publishes the fan-out: stopping it now could lose the message
            return str(item.payload["check_in_id"]), self._node_job(fanout_task, node)
        except (TimeoutError, HarnessError) as exc:
            raise AssertionError(f"{exc}\nbeat log:\n{tail(self.log)}") from None
        finally:
            self.stop()

    def _node_job(self, fanout_task: str, node: str) -> Any:
        client = redis_lib.Redis.from_url(self.app.conf.broker_url)
        found: list[str] = []

        def fanout_done() -> bool:
            for key in client.scan_iter("celery-task-meta-*"):
                meta = json.loads(client.get(key) or "{}")
                if meta.get("name") == fanout_task and meta.get("status") == "SUCCESS":
                    found.append(meta["result"][node])
                    return True
            return False

        wait_until(fanout_done, 30, f"{fanout_task} to succeed")
        return self.app.AsyncResult(found[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@pytest.fixture
def beat(sentry_sink, redis_server, tmp_path, app) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """`beat(entry_name, task, **HOSTER_env)`: a real beat with that overdue entry; stopped after the test."""
    started: list[Beat] = []

    def start(name: str, task: str, **env: str) -> Beat:
        workdir = tmp_path / f"beat-{len(started)}"
        workdir.mkdir()
        _age_schedule(redis_server.url, name, task)
        started.append(Beat(sentry_sink, app, workdir, {"HOSTER_REDIS_URL": redis_server.url,
                                                    "HOSTER_SENTRY_DSN": sentry_sink.dsn, **env}))
        return started[-1]

    yield start
    for b in started:
        b.stop()


def _closing(sink, check_in_id: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [p for p in sink.items("check_in") if p["check_in_id"] == check_in_id and p["status"] in TERMINAL]


def _wait_closed(sink, check_in_id: str, timeout: float = 90) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    item = sink.wait_for(lambda i: i.type == "check_in" and i.payload["check_in_id"] == check_in_id
                         and i.payload["status"] in TERMINAL, timeout=timeout)
    time.sleep(2)  # a second closing check-in (sentry-sdk's own, at the fan-out's return) would be here by now
    closing = _closing(sink, check_in_id)
    assert len(closing) == 1, closing
    return dict(item.payload)


def _sent_at(payload: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00"))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _replication_beat(beat, worker, endpoint: str, speed_limit: float | None = None) -> Beat:  # type: ignore[no-untyped-def]
    entry = {"t": {"cron": "* * * * *", "endpoint": endpoint, "speed_limit": speed_limit}}
    return beat("replicate-t", "hoster.replication.fanout", HOSTER_REPLICATION_SCHEDULE=json.dumps(entry),
                HOSTER_TARGETS=worker.env["HOSTER_TARGETS"])  # the schedule's endpoint must be configured


REPLICATE = ("replicate-t", "hoster.replication.fanout", "src")


def test_schedule_whose_every_replication_fails_ends_its_check_in_as_error(
    node_factory, pool_factory, worker_factory, sentry_sink, test_network, beat, cli
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True,
                                          HOSTER_SENTRY_DSN=sentry_sink.listen_on(test_network.gateway))
    hz.write_random(psrc.ds(f"{VMS_ROOT}/vm1"), 1)
    assert cli("snapshot", "new", "vm1").returncode == 0

    check_in_id, job = _replication_beat(beat, worker, "broken").dispatched(*REPLICATE)
    closed = _wait_closed(sentry_sink, check_in_id)
    assert closed["status"] == "error", closed  # before: "ok", milliseconds after the fan-out started
    assert closed["monitor_slug"] == "replicate-t"
    assert closed["monitor_config"]["schedule"] == {"type": "crontab", "value": "* * * * *"}
    assert closed["monitor_config"]["max_runtime"] == 24 * 60  # added by before_send, as for beat's own
    assert closed["duration"] > 0
    assert job.state == "FAILURE" and "replication failed" in str(job.result)


def test_replication_ends_ok_only_after_the_node_job_finished_through_its_retries(
    node_factory, pool_factory, worker_factory, sentry_sink, test_network, redis_server, beat, cli
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory,
                                          HOSTER_SENTRY_DSN=sentry_sink.listen_on(test_network.gateway))
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 4)
    assert cli("snapshot", "new", "vm1").returncode == 0

    # the dataset is busy: replicate_all's first attempt fails (Transient) and is retried, with its header
    lock = DatasetLock(redis_lib.Redis.from_url(redis_server.url), LockSpec("src", vm, lease=30, wait=1)).acquire()
    try:
        check_in_id, job = _replication_beat(beat, worker, "dst", speed_limit=1).dispatched(*REPLICATE)
        wait_until(lambda: "retry: Retry in" in worker.log_path.read_text(), 30, "replicate_all to retry",
                   on_timeout=lambda: worker.log_tail())
    finally:
        lock.release()
    wait_until(lambda: job.state in ("STARTED", "PROGRESS"), 30, "replicate_all to run again")
    assert _closing(sentry_sink, check_in_id) == []  # the fan-out returned long ago; a retry ends nothing
    assert job.get(timeout=120)["results"]  # 4 MB at 1 MB/s: it took seconds

    closed = _wait_closed(sentry_sink, check_in_id)
    assert closed["status"] == "ok", closed
    assert _sent_at(closed) >= _utc(job.date_done)
    assert closed["duration"] >= 4  # from beat's dispatch to the end of the speed-limited transfer
    assert len(snapshot_names(pdst.ds(f"{VMS_ROOT}/vm1"))) == 1


SLOW_ZFS = """#!/bin/sh
[ "$1" = snapshot ] && sleep 3
exec zfs "$@"
"""


def test_snapshot_check_in_ends_ok_after_take_all_finished(
    pool_factory, worker_factory, sentry_sink, redis_server, beat, tmp_path
):
    slow_zfs = tmp_path / "slow-zfs"
    slow_zfs.write_text(SLOW_ZFS)
    slow_zfs.chmod(0o755)
    pool = pool_factory()
    (vm,) = make_vms(pool, "a")
    worker_factory("n1", node_env(pool, HOSTER_SENTRY_DSN=sentry_sink.dsn, HOSTER_ZFS_COMMAND=str(slow_zfs)))
    schedule = json.dumps({"t": {"cron": "* * * * *", "stype": "frequent", "keep": 2}})
    check_in_id, job = beat("snapshot-t", "hoster.snapshot.fanout", HOSTER_SNAPSHOT_SCHEDULE=schedule
                            ).dispatched("snapshot-t", "hoster.snapshot.fanout", "n1")
    wait_until(lambda: job.state == "STARTED", 30, "take_all to run")
    assert _closing(sentry_sink, check_in_id) == []
    assert job.get(timeout=60)["taken"]  # `zfs snapshot` took 3 s

    closed = _wait_closed(sentry_sink, check_in_id)
    assert closed["status"] == "ok", closed
    assert _sent_at(closed) >= _utc(job.date_done)
    assert closed["duration"] >= 3
    assert closed["monitor_config"]["max_runtime"] == 2 * 60
    assert any(n.startswith("frequent_") for n in snapshot_names(vm))
    assert redis_lib.Redis.from_url(redis_server.url).keys("hoster:fanout:*") == []  # gone with the check-in

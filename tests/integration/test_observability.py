"""Observability through the real parts: Sentry events and Crons check-ins from real workers and a real beat,
Prometheus metrics, `status`, ERROR_ files, and the Python client's validation and routing."""

from __future__ import annotations

import json
import os
import shelve
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_lib
from harness import zfs as hz
from harness.proc import tail, wait_until
from prometheus_client.parser import text_string_to_metric_families
from scenario import VMS_ROOT, make_vms, node_env, snapshot_names, two_nodes

from hoster_tasks import keys
from hoster_tasks.locks import DatasetLock, LockSpec

SECRET_PW = "s3cret-Redis-pw-9431"
BROKEN_STDERR = "dataset does not exist"


def _secret_redis_url(redis_server, redis_client) -> str:  # type: ignore[no-untyped-def]
    """A Redis ACL user with a password on the shared server (the default user stays open for the rest)."""
    redis_client.execute_command("ACL", "SETUSER", "hoster", "on", f">{SECRET_PW}", "~*", "&*", "+@all")
    return redis_server.url.replace("redis://", f"redis://hoster:{SECRET_PW}@")


def _event_summary(sink) -> list[str]:  # type: ignore[no-untyped-def]
    return [str((e.get("exception") or {}).get("values", [{}])[-1].get("value", e.get("message")))[:120]
            for e in sink.events()]


# -- Sentry ------------------------------------------------------------------------------------------------

def test_final_failure_sends_one_event_with_context_and_no_secrets(
    node_factory, pool_factory, worker_factory, sentry_sink, test_network, redis_server, redis_client, cli
):
    url = _secret_redis_url(redis_server, redis_client)
    src, dst, psrc, pdst, worker = two_nodes(
        node_factory, pool_factory, worker_factory, broken_target=True,
        HOSTER_REDIS_URL=url, HOSTER_SENTRY_ENVIRONMENT="itest",
        HOSTER_SENTRY_DSN=sentry_sink.listen_on(test_network.gateway),
    )
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 1)
    assert cli("snapshot", "new", "vm1").returncode == 0
    res = cli("vm", "replicate", "vm1", "--endpoint", "broken")
    assert res.returncode == 1 and BROKEN_STDERR in res.stderr, res.stderr

    event = sentry_sink.wait_for_event(lambda e: "exception" in e, timeout=20)
    time.sleep(2)  # anything else the failure would send has arrived by now
    assert len(sentry_sink.events()) == 1, _event_summary(sentry_sink)
    assert event["exception"]["values"][-1]["type"] == "DatasetNotFound"
    assert event["environment"] == "itest"
    assert event["tags"]["node"] == "src" and event["tags"]["component"] == "worker"
    assert event["tags"]["dataset"] == vm and event["tags"]["target"] == "broken"
    context = event["contexts"]["hoster_tasks"]
    assert context["dataset"] == vm and context["node"] == "src" and context["target"] == "broken"
    assert BROKEN_STDERR in context["stderr"] and "cannot receive" in context["stderr"]

    raw = json.dumps(event)
    assert SECRET_PW not in raw and url not in raw
    assert str(dst.key_file) not in raw and "id_ed25519" not in raw
    assert "[key_file]" in event["exception"]["values"][-1]["value"]  # the ssh argv is still readable
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames and not any("vars" in f for f in frames)  # locals hold Settings and Redis objects
    assert not sentry_sink.errors


def test_successful_snapshot_and_retried_transient_failure_send_no_event(
    node_factory, pool_factory, worker_factory, sentry_sink, test_network, redis_server, cli
):
    src, dst, psrc, pdst, worker = two_nodes(
        node_factory, pool_factory, worker_factory, broken_target=True,
        HOSTER_SENTRY_DSN=sentry_sink.listen_on(test_network.gateway),
    )
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    assert cli("snapshot", "new", "vm1").returncode == 0

    client = redis_lib.Redis.from_url(redis_server.url)
    lock = DatasetLock(client, LockSpec("src", vm, lease=30, wait=1)).acquire()
    outcome: list[subprocess.CompletedProcess[str]] = []
    runner = threading.Thread(target=lambda: outcome.append(cli("vm", "replicate", "vm1", "--endpoint", "dst")))
    runner.start()
    try:
        # Busy (Transient): the first attempt waits lock_wait_seconds, fails, and is retried
        wait_until(lambda: "retry: Retry in" in worker.log_path.read_text(), 30, "the replication step to retry",
                   on_timeout=lambda: worker.log_tail())
    finally:
        lock.release()
    runner.join(timeout=90)
    assert outcome and outcome[0].returncode == 0, outcome and outcome[0].stderr
    assert "Busy" in worker.log_path.read_text()
    assert len(snapshot_names(pdst.ds(f"{VMS_ROOT}/vm1"))) == 1  # it did replicate after the retry
    time.sleep(3)  # the retry and the success would have been reported by now
    assert sentry_sink.events() == [], _event_summary(sentry_sink)
    assert not sentry_sink.errors


# -- Sentry Crons from a real beat ---------------------------------------------------------------------------

def _age_beat_schedule(path: Path, name: str, task: str, args: list[object]) -> None:
    """Beat's schedule file as a previous beat run leaves it, with the entry last run 5 minutes ago: a fresh
    beat then runs the overdue entry at once instead of waiting for the next minute."""
    import celery
    from celery.beat import ScheduleEntry
    from celery.schedules import crontab

    entry = ScheduleEntry(name=name, task=task, schedule=crontab(), args=args, total_run_count=1,
                          last_run_at=datetime.now(UTC) - timedelta(minutes=5))
    with shelve.open(str(path)) as db:
        db.update({"entries": {name: entry}, "__version__": celery.__version__, "tz": "UTC", "utc_enabled": True})


def test_beat_check_ins_carry_schedule_and_max_runtime(
    pool_factory, worker_factory, sentry_sink, redis_server, tmp_path
):
    from hoster_tasks.observability.sentry import cron_monitor_extra

    pool = pool_factory()
    (a,) = make_vms(pool, "a")
    worker_factory("n1", node_env(pool, HOSTER_SENTRY_DSN=sentry_sink.dsn))
    beat_dir = tmp_path / "beat"
    beat_dir.mkdir()
    _age_beat_schedule(beat_dir / "celerybeat-schedule", "snapshot-t", "hoster.snapshot.fanout", ["frequent", 2])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
    env.update(HOSTER_REDIS_URL=redis_server.url, HOSTER_SENTRY_DSN=sentry_sink.dsn, HOSTER_NODE_NAME="control",
               HOSTER_SNAPSHOT_SCHEDULE='{"t": {"cron": "* * * * *", "stype": "frequent", "keep": 2}}',
               PYTHONUNBUFFERED="1")
    log = beat_dir / "beat.log"
    with open(log, "wb") as out:
        beat = subprocess.Popen([sys.executable, "-m", "hoster_tasks", "beat"], cwd=beat_dir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def check_in(status: str):  # type: ignore[no-untyped-def]
            return sentry_sink.wait_for(
                lambda i: i.type == "check_in" and i.payload["monitor_slug"] == "snapshot-t"
                and i.payload["status"] == status, timeout=75)

        try:
            started = check_in("in_progress").payload  # sent by beat when it dispatches the entry
            done = check_in("ok").payload  # sent by the worker when the fan-out task succeeded
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nbeat log:\n{tail(log)}") from None
    finally:
        beat.terminate()
        beat.wait(timeout=15)
    extra = cron_monitor_extra("snapshot-t")
    for payload in (started, done):
        config = payload["monitor_config"]
        assert config["schedule"] == {"type": "crontab", "value": "* * * * *"}
        assert config["timezone"] == "UTC"
        assert config["max_runtime"] == extra["max_runtime"] and config["checkin_margin"] == extra["checkin_margin"]
    assert done["check_in_id"] == started["check_in_id"]
    assert done["duration"] is not None and done["duration"] >= 0
    # the fan-out really ran the schedule's job on the node
    wait_until(lambda: any(n.startswith("frequent_") for n in snapshot_names(a)), 20, "the scheduled snapshot")
    assert cron_monitor_extra("replicate-hoster02")["max_runtime"] >= 12 * 60  # a long replication fits


# -- metrics, status, ERROR_ files ---------------------------------------------------------------------------

def _families(text: str) -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _value(families, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    matches = [s.value for s in families.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, families.get(name))
    return float(matches[0])


def test_metrics_status_and_error_file_after_success_and_failure(
    node_factory, pool_factory, worker_factory, redis_server, cli, tmp_path
):
    textfile = tmp_path / "textfile" / "hoster_tasks.prom"
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True,
                                          HOSTER_METRICS_TEXTFILE=str(textfile))
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 2)
    before = time.time()
    assert cli("snapshot", "new", "vm1").returncode == 0
    res = cli("vm", "replicate", "vm1", "--endpoint", "dst", "--json")
    assert res.returncode == 0, res.stderr
    sent = json.loads(res.stdout)["bytes"]

    metrics = cli("metrics")
    assert metrics.returncode == 0, metrics.stderr
    fam = _families(metrics.stdout)
    last_snapshot = _value(fam, "hoster_tasks_last_snapshot_timestamp_seconds", node="src", dataset=vm)
    assert before - 1 <= last_snapshot <= time.time()
    ok = {"node": "src", "dataset": vm, "target": "dst"}
    assert before <= _value(fam, "hoster_tasks_last_replication_success_timestamp_seconds", **ok) <= time.time()
    assert _value(fam, "hoster_tasks_replication_bytes_total", **ok) == sent > 0  # exact, not rounded
    assert 0 <= _value(fam, "hoster_tasks_replication_lag_seconds", **ok) < 120
    assert _value(fam, "hoster_tasks_replication_error", **ok) == 0
    assert _value(fam, "hoster_tasks_node_up", node="src") == 1
    assert _value(fam, "hoster_tasks_node_last_heartbeat_timestamp_seconds", node="src") >= before - 5

    error_file = worker.log_path.parent / "errors" / "ERROR_to_broken"
    assert not error_file.exists()
    res = cli("vm", "replicate", "vm1", "--endpoint", "broken")
    assert res.returncode == 1
    fam = _families(cli("metrics").stdout)
    bad = {"node": "src", "dataset": vm, "target": "broken"}
    assert _value(fam, "hoster_tasks_replication_error", **bad) == 1
    assert _value(fam, "hoster_tasks_replication_failures_total", **bad) >= 1
    assert _value(fam, "hoster_tasks_replication_error", **ok) == 0  # the other target is fine
    assert error_file.exists() and BROKEN_STDERR in error_file.read_text()

    # the worker's own textfile (node_exporter), refreshed after every task and by the heartbeat
    def textfile_has_error() -> bool:
        if not textfile.exists():
            return False
        return _value(_families(textfile.read_text()), "hoster_tasks_replication_error", **bad) == 1

    wait_until(textfile_has_error, 10, "the worker's metrics textfile to show the failure")
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"

    # `status`: node, VM, last snapshot, targets, lag, last error
    status = cli("status")
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "Hoster Nodes" in text and "Hoster VMs" in text
    rows = [line for line in text.splitlines() if "│ vm1 " in line]
    assert len(rows) == 2, text  # one row per target
    good_row = next(r for r in rows if "│ dst " in r)
    bad_row = next(r for r in rows if "│ broken " in r)
    assert "src" in good_row and "ago" in good_row and "never" not in good_row.split("│")[3]
    assert "cannot open" in bad_row and BROKEN_STDERR in bad_row  # the stderr, not the ssh argv
    assert "ssh -o" not in text
    data = json.loads(cli("status", "--json").stdout)
    assert [n["node"] for n in data["nodes"] if n["up"]] == ["src"]
    (row,) = [v for v in data["vms"] if v["vm"] == "vm1"]
    assert row["node"] == "src" and row["dataset"] == vm and row["last_snapshot"].startswith(f"{vm}@")
    assert set(row["replication"]) == {"dst", "broken"}
    assert row["replication"]["broken"]["error"] == "1" and BROKEN_STDERR in row["replication"]["broken"]["last_error"]
    assert float(row["replication"]["dst"]["target_newest_creation"]) > 0
    assert data["locks"] == {}

    # a held lock shows, with its lease
    lock = DatasetLock(redis_lib.Redis.from_url(redis_server.url), LockSpec("src", vm, lease=30, wait=1)).acquire()
    try:
        held = cli("status").stdout
        locks = json.loads(cli("status", "--json").stdout)["locks"]
    finally:
        lock.release()
    assert list(locks) == [keys.dataset_lock("src", vm)] and 0 < locks[keys.dataset_lock("src", vm)] <= 30
    lock_rows = held.split("Held Locks", 1)[1]
    assert "src" in lock_rows and vm in lock_rows


# -- the Python client ---------------------------------------------------------------------------------------

def test_client_validates_before_sending_and_routes_to_the_vms_node(pool_factory, worker_factory, redis_server, app):
    from hoster_tasks.client import Client
    from hoster_tasks.errors import ConfigError, InvalidName, NoLiveNode
    from hoster_tasks.settings import Settings

    p1, p2 = pool_factory(), pool_factory()
    (alpha,) = make_vms(p1, "alpha")
    (beta,) = make_vms(p2, "beta")
    w1 = worker_factory("n1", node_env(p1))
    w2 = worker_factory("n2", node_env(p2))
    client = Client(Settings.from_env(redis_url=redis_server.url), app=app)
    raw = redis_lib.Redis.from_url(redis_server.url)
    keys_before = set(raw.keys("*"))

    bad_calls = [
        (InvalidName, lambda: client.snapshot("a;rm -rf /")),
        (InvalidName, lambda: client.snapshot("../etc")),
        (InvalidName, lambda: client.snapshot("alpha", stype="bogus")),
        (ConfigError, lambda: client.snapshot("alpha", keep=0)),
        (ConfigError, lambda: client.replicate("alpha", "dst", speed_limit=0)),
        (ConfigError, lambda: client.replicate("alpha", "no-such-target")),  # n1 has no such endpoint
        (NoLiveNode, lambda: client.replicate_all("no-such-target")),
        (InvalidName, lambda: client.replicate_all("dst", vms=["$(id)"])),
        (InvalidName, lambda: client.replicate_all("dst", script_name="../../etc/x")),
        (ConfigError, lambda: client.snapshot_all("hourly", 0)),
        (InvalidName, lambda: client.destroy("no-at-sign")),
    ]
    for exc_type, call in bad_calls:
        with pytest.raises(exc_type):
            call()
    time.sleep(0.5)
    # nothing was published: no task message or result key appeared, no worker received anything
    assert {k for k in set(raw.keys("*")) - keys_before if not k.startswith(b"hoster:node")} == set()
    assert "Task hoster." not in w1.log_path.read_text() + w2.log_path.read_text()

    result = client.snapshot("beta", stype="custom", keep=3)
    out = result.get(timeout=60)
    assert out["taken"] and out["taken"][0].startswith(f"{beta}@")
    assert len(snapshot_names(beta)) == 1 and snapshot_names(alpha) == []
    meta = app.backend.get_task_meta(result.id)
    assert meta["queue"] == keys.node_queue("n2") and meta["worker"].startswith("n2@")
    assert f"hoster.snapshot.take[{result.id}]" in w2.log_path.read_text()
    assert result.id not in w1.log_path.read_text()

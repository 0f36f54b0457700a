"""`status` and `metrics` read the state through per-node indexes, never by scanning the keyspace, and the state
keys expire (hoster_tasks/observability/{state,status,metrics}.py; written by snapshots.record_snapshots and
Replicator.record_success/record_failure).

Against a private real redis-server: every command the readers send is captured with MONITOR, so a SCAN or
KEYS anywhere (redis-py's scan_iter included) is seen, and the number of commands is compared with and without
thousands of unrelated keys (Celery's results share this Redis).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from hoster_tasks import keys
from hoster_tasks.nodes import VmInfo, publish
from hoster_tasks.observability.metrics import collect_metrics
from hoster_tasks.observability.status import collect_status
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.snapshots import NodeContext, record_snapshots
from hoster_tasks.zfs.probe import OPENZFS2

NODE, TARGET = "node1", "backup1"
ROOT, T_ROOT = "zroot/vm", "tank/backup/vm"
VM1, VM2, COPY = f"{ROOT}/vm1", f"{ROOT}/vm2", f"{ROOT}/other"
T_VM1 = f"{T_ROOT}/vm1"
NOW = datetime(2026, 5, 6, 10, 33, tzinfo=UTC)
UNRELATED = 5000


@pytest.fixture
def server(private_redis: Any) -> Any:
    return private_redis


def settings(url: str) -> Settings:
    ep = Endpoint(name=TARGET, host="192.0.2.10", root_map={ROOT: T_ROOT})
    return Settings(redis_url=url, node_name=NODE, datasets=[ROOT], targets=[ep])


class NoShell:
    host = TARGET

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the shell was used ({name})")


def write_state(client: redis.Redis, s: Settings) -> None:
    """What the jobs write: a heartbeat, two snapshots, a success and a failure."""
    publish(client, s, [VmInfo("vm1", VM1, NODE), VmInfo("vm2", VM2, NODE), VmInfo("other", COPY, "node9")],
            time.time())
    ctx = NodeContext(s, NoShell(), OPENZFS2, client)  # type: ignore[arg-type]
    record_snapshots(ctx, [f"{VM1}@hourly_2026-05-06_10-33-00", f"{VM2}@hourly_2026-05-06_10-33-00"], NOW)
    rep = Replicator(ctx, s.targets[0], target_shell=NoShell())  # type: ignore[arg-type]
    rep.record_success(VM1, 4096, 1.5, int(NOW.timestamp()) - 60)
    rep.record_success(VM1, 1024, 0.5, int(NOW.timestamp()))
    rep.record_failure(VM2, "[backup1] zfs receive exited 1: out of space")
    client.set(keys.dataset_lock(TARGET, T_VM1), "holder", px=30_000)  # a replication holds the copy


def add_unrelated_keys(client: redis.Redis, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for _ in range(n):
        pipe.set(f"celery-task-meta-{uuid.uuid4()}", '{"status": "SUCCESS", "result": null}')
    pipe.execute()


def commands_of(url: str, action: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run `action`; return its result and every command the server received meanwhile (MONITOR)."""
    seen: list[str] = []
    marker = f"end-{uuid.uuid4().hex}"
    ready = threading.Event()
    watcher = redis.Redis.from_url(url, decode_responses=True)

    def watch() -> None:
        with watcher.monitor() as mon:
            ready.set()
            for event in mon.listen():
                command = str(event["command"])
                if marker in command:
                    return
                seen.append(command)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(10)
    with redis.Redis.from_url(url) as probe:  # MONITOR is on once its first event arrives: wait for it
        start = f"start-{uuid.uuid4().hex}"
        while not any(start in c for c in seen):
            probe.echo(start)
            time.sleep(0.05)
        seen.clear()
        result = action()
        probe.echo(marker)
    thread.join(10)
    assert not thread.is_alive()
    watcher.close()
    return result, seen


def verbs(commands: list[str]) -> list[str]:
    return [c.split()[0].strip('"').upper() for c in commands]


def test_status_and_metrics_issue_no_scan_and_cost_the_same_with_thousands_of_unrelated_keys(server: Any) -> None:
    s = settings(server.url)
    client = redis.Redis.from_url(server.url)
    write_state(client, s)
    now = NOW.timestamp() + 120

    status, few = commands_of(server.url, lambda: collect_status(s, now=now))
    metrics, few_m = commands_of(server.url, lambda: collect_metrics(s, now=now))
    add_unrelated_keys(client, UNRELATED)
    assert client.dbsize() > UNRELATED
    status_again, many = commands_of(server.url, lambda: collect_status(s, now=now))
    metrics_again, many_m = commands_of(server.url, lambda: collect_metrics(s, now=now))

    for sent in (few, many, few_m, many_m):
        assert not {"SCAN", "KEYS", "HSCAN", "SSCAN", "ZSCAN"} & set(verbs(sent)), sent
    assert verbs(many) == verbs(few) and verbs(many_m) == verbs(few_m)  # cost: the VMs, not the keyspace
    assert metrics_again == metrics
    assert set(status_again.pop("locks")) == set(status["locks"])  # the lease itself runs down meanwhile
    assert status_again == {k: v for k, v in status.items() if k != "locks"}

    rows = {v["vm"]: v for v in status["vms"]}
    assert set(rows) == {"vm1", "vm2", "other"}
    assert rows["vm1"]["last_snapshot"] == f"{VM1}@hourly_2026-05-06_10-33-00"
    assert rows["vm1"]["last_snapshot_time"] == str(NOW.timestamp())
    r1 = rows["vm1"]["replication"][TARGET]
    assert (r1["bytes"], r1["bytes_total"], r1["error"]) == ("1024", "5120", "0")
    r2 = rows["vm2"]["replication"][TARGET]
    assert (r2["error"], r2["failures"]) == ("1", "1") and "out of space" in r2["last_error"]
    assert rows["other"]["replication"] == {} and rows["other"]["last_snapshot"] is None
    assert [n["node"] for n in status["nodes"]] == [NODE]
    assert set(status["locks"]) == {keys.dataset_lock(TARGET, T_VM1)}  # named from the endpoint's root_map
    assert 0 < status["locks"][keys.dataset_lock(TARGET, T_VM1)] <= 30

    labels = f'node="{NODE}",dataset="{VM1}",target="{TARGET}"'
    assert f"hoster_tasks_replication_bytes_total{{{labels}}} 5120" in metrics
    assert f"hoster_tasks_replication_lag_seconds{{{labels}}} 120" in metrics
    assert f'hoster_tasks_replication_failures_total{{node="{NODE}",dataset="{VM2}",target="{TARGET}"}} 1' in metrics
    assert f'hoster_tasks_last_snapshot_timestamp_seconds{{node="{NODE}",dataset="{VM2}"}} {int(NOW.timestamp())}' \
        in metrics
    assert f'hoster_tasks_node_up{{node="{NODE}"}} 1' in metrics
    client.close()


def test_state_keys_expire_and_every_write_renews_them(server: Any) -> None:
    s = settings(server.url)
    client = redis.Redis.from_url(server.url)
    write_state(client, s)
    state_keys = [keys.dataset_state(NODE, VM1), keys.dataset_state(NODE, VM2),
                  keys.replication_state(NODE, VM1, TARGET), keys.replication_state(NODE, VM2, TARGET),
                  keys.dataset_state_index(NODE), keys.replication_state_index(NODE)]
    for key in state_keys:
        assert keys.STATE_TTL_SECONDS - 3600 < client.ttl(key) <= keys.STATE_TTL_SECONDS, key
    assert keys.STATE_TTL_SECONDS == 30 * 24 * 3600

    for key in state_keys:
        client.expire(key, 100)
    write_state(client, s)
    for key in state_keys:
        assert client.ttl(key) > keys.STATE_TTL_SECONDS - 3600, key
    client.close()


def test_a_retired_vms_state_leaves_the_index_and_the_output(server: Any) -> None:
    s = settings(server.url)
    client = redis.Redis.from_url(server.url)
    write_state(client, s)
    index = keys.replication_state_index(NODE)
    retired = keys.replication_member(f"{ROOT}/retired", TARGET)
    client.zadd(index, {retired: time.time() - keys.STATE_TTL_SECONDS - 10})  # its hash expired long ago
    client.delete(keys.dataset_state(NODE, VM2))  # as its TTL would

    metrics = collect_metrics(s, now=NOW.timestamp())
    snapshot_lines = [ln for ln in metrics.splitlines() if ln.startswith("hoster_tasks_last_snapshot_timestamp")]
    assert [ln.split('dataset="')[1].split('"')[0] for ln in snapshot_lines] == [VM1]
    assert f"{ROOT}/retired" not in metrics

    Replicator(NodeContext(s, NoShell(), OPENZFS2, client), s.targets[0],  # type: ignore[arg-type]
               target_shell=NoShell()).record_success(VM1, 1, 0.1, 0)  # type: ignore[arg-type]
    assert client.zscore(index, retired) is None  # trimmed by the next write
    assert client.zscore(index, keys.replication_member(VM1, TARGET)) is not None
    client.close()

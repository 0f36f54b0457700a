"""The state behind `vm failed` / `vm retry` and `node forget` (hoster_tasks/failed.py, node_admin.py, written by
Replicator.record_success/record_failure), and `config check`'s environment line, against a private real
redis-server: a failing streak's start and count, the ERROR_ files a failure went to and their clearing by the
next success, and a forget that removes exactly the node's keys, through its indexes (no SCAN or KEYS)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from hoster_tasks import keys
from hoster_tasks.config_check import check_environment
from hoster_tasks.failed import failed_replications
from hoster_tasks.node_admin import NodeIsUp, UnknownNode, forget_node, list_nodes
from hoster_tasks.nodes import VmInfo, publish
from hoster_tasks.observability.errorfile import read_errors
from hoster_tasks.replication.replicator import Replicator
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.snapshots import NodeContext, record_snapshots
from hoster_tasks.zfs.probe import OPENZFS2

NODE, OTHER, TARGET = "node1", "node2", "backup1"
ROOT = "zroot/vm"
VM1, VM2 = f"{ROOT}/vm1", f"{ROOT}/vm2"


@pytest.fixture
def url(private_redis: Any) -> str:
    return str(private_redis.url)


class NoShell:
    host = TARGET

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the shell was used ({name})")


def _settings(url: str, tmp_path: Path, node: str = NODE) -> Settings:
    ep = Endpoint(name=TARGET, host="192.0.2.10", root_map={ROOT: "tank/vm"})
    return Settings(redis_url=url, node_name=node, datasets=[ROOT], targets=[ep], error_dir=tmp_path / "errors")


def _replicator(client: redis.Redis, s: Settings, error_name: str | None = None) -> Replicator:
    rep = Replicator(NodeContext(s, NoShell(), OPENZFS2, client), s.targets[0],  # type: ignore[arg-type]
                     target_shell=NoShell())  # type: ignore[arg-type]
    rep.error_name = error_name
    return rep


def test_a_streak_counts_its_attempts_from_its_first_failure_and_a_success_ends_it(url: str, tmp_path: Path) -> None:
    s = _settings(url, tmp_path)
    client = redis.Redis.from_url(url)
    publish(client, s, [VmInfo("vm1", VM1, NODE)], time.time())
    rep = _replicator(client, s)
    rep.record_failure(VM1, "first")
    first = failed_replications(client)[0]
    rep.record_failure(VM1, "second")
    [row] = failed_replications(client)
    assert (row.vm, row.endpoint, row.attempts, row.error) == ("vm1", TARGET, 2, "second")
    assert row.since == first.since and row.last_failure is not None and row.last_failure >= row.since

    rep.record_success(VM1, 10, 0.1, 0)
    assert failed_replications(client) == []
    rep.record_failure(VM1, "again")
    [row] = failed_replications(client)
    assert row.attempts == 1 and row.since is not None and first.since is not None and row.since > first.since
    client.close()


def test_a_success_clears_its_line_in_every_error_file_its_failures_went_to(url: str, tmp_path: Path) -> None:
    s = _settings(url, tmp_path)
    client = redis.Redis.from_url(url)
    publish(client, s, [VmInfo("vm1", VM1, NODE), VmInfo("vm2", VM2, NODE)], time.time())
    nightly = _replicator(client, s, "nightly")
    nightly.record_failure(VM1, "diverged")
    nightly.record_failure(VM2, "diverged")
    _replicator(client, s).record_failure(VM1, "diverged")  # `vm replicate`: ERROR_to_backup1
    from hoster_tasks.observability.errorfile import update_errors

    update_errors(s.error_dir, "nightly", {VM1: "diverged", VM2: "diverged"}, [])  # as the tasks write them
    update_errors(s.error_dir, f"to_{TARGET}", {VM1: "diverged"}, [])
    assert [r.error_files for r in failed_replications(client, vm="vm1")] == [("nightly", f"to_{TARGET}")]

    _replicator(client, s).record_success(VM1, 10, 0.1, 0)  # e.g. `vm retry`: the default job name
    assert read_errors(s.error_dir, "nightly") == {VM2: "diverged"}  # another VM's failure stays
    assert not (s.error_dir / f"ERROR_to_{TARGET}").exists()
    assert [r.dataset for r in failed_replications(client)] == [VM2]
    assert failed_replications(client, endpoint="elsewhere") == []
    client.close()


def test_forget_removes_a_down_nodes_keys_only_and_refuses_a_live_one(url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(url)
    for node in (NODE, OTHER):
        s = _settings(url, tmp_path, node)
        publish(client, s, [VmInfo("vm1", VM1, node)], time.time())
        record_snapshots(NodeContext(s, NoShell(), OPENZFS2, client),  # type: ignore[arg-type]
                         [f"{VM1}@hourly_2026-05-06_10-33-00"], datetime(2026, 5, 6, 10, 33, tzinfo=UTC))
        _replicator(client, s).record_failure(VM1, "x")
    with pytest.raises(NodeIsUp):
        forget_node(client, NODE)
    client.delete(keys.node(NODE))  # its heartbeat stopped: the key expired
    assert [(r["node"], r["up"]) for r in list_nodes(client)] == [(NODE, False), (OTHER, True)]

    before = set(client.keys("*"))  # the test looks at the whole keyspace; the code under test never does
    forget_node(client, NODE)
    gone = {k.decode() for k in before - set(client.keys("*"))}
    assert gone == {keys.dataset_state(NODE, VM1), keys.replication_state(NODE, VM1, TARGET),
                    keys.dataset_state_index(NODE), keys.replication_state_index(NODE)}
    assert [r["node"] for r in list_nodes(client)] == [OTHER]
    assert [r.node for r in failed_replications(client)] == [OTHER]
    with pytest.raises(UnknownNode):
        forget_node(client, NODE)
    client.close()


def test_config_check_names_a_misspelt_variable() -> None:
    [line] = check_environment({"HOSTER_REDIS_URL": "redis://x", "HOSTER_TARGET": "[]", "PATH": "/bin"})
    assert line.failed and "HOSTER_TARGET" in line.detail and "HOSTER_REDIS_URL" not in line.detail
    [line] = check_environment({"HOSTER_REDIS_URL": "redis://x", "HOSTER_TARGETS": "[]"})
    assert not line.failed

"""The harness itself, exercised for real: Redis, zfs-fuse pools, namespaced nodes with sshd, the Sentry
sink, and (once the application has its entry point) a worker process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import redis
from harness import NodeFactory, NodeNetwork, PoolFactory, RedisServer, SentrySink, WorkerFactory, zfs
from harness.proc import HarnessError
from harness.workers import worker_available

pytestmark = pytest.mark.integration


def _redis_ping_from(node_exec: Callable[..., subprocess.CompletedProcess[str]], url: str) -> str:
    code = "import redis, sys; print(redis.Redis.from_url(sys.argv[1], socket_timeout=3).ping())"
    return node_exec([sys.executable, "-c", code, url]).stdout.strip()


def test_redis_private_instance_kill_and_restart(
    redis_factory: Callable[[], RedisServer], node_factory: NodeFactory
) -> None:
    server = redis_factory()
    client = server.client()
    client.set("k", "v")
    assert client.get("k") == "v"

    node = node_factory("rnode")
    assert _redis_ping_from(node.exec, server.url) == "True"  # bound on the bridge: reachable from nodes

    server.kill()
    assert not server.ping()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    server.start()
    assert server.ping() and client.get("k") is None  # no persistence: a crash loses everything
    port = server.port
    server.restart()
    assert server.port == port and server.ping()


def test_shared_redis_is_flushed_per_test(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("left-behind", "1")  # the next test using redis_client must not see it
    assert redis_server.url.startswith("redis://10.77.")


def test_pool_and_zfs_helpers(pool_factory: PoolFactory) -> None:
    pool = pool_factory()
    ds = pool.create_dataset("vm/alpha")
    assert zfs.exists(ds) and zfs.datasets(pool.ds("vm")) == [pool.ds("vm"), ds]
    assert zfs.mountpoint(ds) == pool.mountpoint / "vm" / "alpha"

    path = zfs.write_random(ds, 3)
    assert path.stat().st_size == 3 * 1024 * 1024
    first = zfs.snapshot(ds, "s1")
    zfs.write_random(ds, 1)
    zfs.snapshot(pool.ds("vm"), "s2", recursive=True)

    snaps = zfs.snapshots(ds)
    assert [s.name for s in snaps] == [first, f"{ds}@s2"]
    assert snaps[0].createtxg < snaps[1].createtxg and all(s.guid > 0 for s in snaps)
    assert zfs.snapshots(pool.ds("vm")) == [
        s for s in zfs.snapshots(pool.ds("vm"), recursive=True) if "/alpha" not in s.name
    ]
    assert set(zfs.snapshot_guids(pool.ds("vm"), recursive=True)) == {
        f"{pool.ds('vm')}@s2",
        first,
        f"{ds}@s2",
    }
    assert zfs.get_property(first, "guid") == str(snaps[0].guid)
    zfs.set_property(ds, "hoster:test", "yes")
    assert zfs.get_property(ds, "hoster:test") == "yes"
    with pytest.raises(HarnessError):
        zfs.snapshot(ds, "s1")  # already exists


def test_ssh_between_nodes_and_link_down(
    node_factory: NodeFactory, test_network: NodeNetwork, pool_factory: PoolFactory
) -> None:
    pool = pool_factory()
    a, b = node_factory("a"), node_factory("b")
    assert a.address != b.address and a.address.startswith(test_network.gateway.rsplit(".", 1)[0])

    # From the root namespace and from inside node b: zfs-fuse is shared, so a sees the pool.
    assert pool.name in a.ssh("zfs", "list", "-H", "-o", "name").stdout.split()
    assert pool.name in a.ssh("zfs", "list", "-H", "-o", "name", via=b).stdout.split()
    # Plain argv as the brief states it (StrictHostKeyChecking=yes proves known_hosts is right).
    argv = [
        "ssh", "-i", str(a.key_file), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={a.known_hosts}", f"root@{a.address}", "zfs", "list",
    ]  # fmt: skip
    assert pool.name in b.exec(argv).stdout
    assert b.exec(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.count(b.address) == 1

    a.link_down()
    cut = a.ssh("true", via=b, check=False, timeout=30, connect_timeout=1)
    assert cut.returncode == 255
    a.link_up()
    assert a.ssh("hostname", via=b).returncode == 0


def test_send_over_ssh_into_node_receives_with_u(node_factory: NodeFactory, pool_factory: PoolFactory) -> None:
    src, dst = pool_factory(), pool_factory()
    ds = src.create_dataset("vm/one")
    zfs.write_random(ds, 8)
    snap = zfs.snapshot(ds, "r1")
    target = dst.ds("copy")
    node = node_factory("backup")

    send = subprocess.Popen(["zfs", "send", snap], stdout=subprocess.PIPE)
    recv = subprocess.run(node.ssh_argv("zfs", "receive", "-u", target), stdin=send.stdout, capture_output=True)
    assert send.stdout is not None
    send.stdout.close()
    assert send.wait(timeout=60) == 0 and recv.returncode == 0, recv.stderr
    assert zfs.snapshot_guids(target) == {f"{target}@r1": zfs.snapshots(ds)[0].guid}
    assert sum(f.stat().st_size for f in zfs.mount(target).iterdir()) == 8 * 1024 * 1024


def test_sentry_sink_with_real_sdk(sentry_sink: SentrySink) -> None:
    # A child process: sentry_sdk.init is global state that must not leak into other tests.
    code = """
import sys, sentry_sdk
from sentry_sdk.crons import capture_checkin
sentry_sdk.init(dsn=sys.argv[1], environment="test")
sentry_sdk.capture_message("hello from the harness")
try:
    1 / 0
except ZeroDivisionError:
    sentry_sdk.capture_exception()
capture_checkin(monitor_slug="harness-cron", status="ok")
sentry_sdk.flush(timeout=10)
"""
    subprocess.run([sys.executable, "-c", code, sentry_sink.dsn], check=True, timeout=60)
    sentry_sink.wait_for_event(lambda e: e.get("message") == "hello from the harness")
    error = sentry_sink.wait_for_event(lambda e: "exception" in e)
    assert error["exception"]["values"][-1]["type"] == "ZeroDivisionError"
    assert error["environment"] == "test"
    assert [c["monitor_slug"] for c in sentry_sink.items("check_in")] == ["harness-cron"]
    assert len(sentry_sink.events()) == 2 and not sentry_sink.errors


def test_sentry_sink_reachable_from_a_node(
    sentry_sink: SentrySink, node_factory: NodeFactory, test_network: NodeNetwork
) -> None:
    dsn = sentry_sink.listen_on(test_network.gateway)
    node = node_factory("sentry")
    code = "import sys, sentry_sdk as s; s.init(dsn=sys.argv[1]); s.capture_message('ns'); s.flush(10)"
    node.exec([sys.executable, "-c", code, dsn])
    assert sentry_sink.wait_for_event(lambda e: e.get("message") == "ns")


@pytest.mark.skipif(not worker_available(), reason="hoster_tasks/__main__.py does not exist yet")
def test_worker_starts_in_a_node_and_stops(
    worker_factory: WorkerFactory,
    node_factory: NodeFactory,
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
) -> None:
    from hoster_tasks import keys

    pool = pool_factory()
    vm_root = pool.create_dataset("vm")
    node = node_factory("w1")
    worker = worker_factory(node, {"HOSTER_DATASETS": [vm_root], "HOSTER_HEARTBEAT_SECONDS": 1})
    assert redis_client.exists(keys.node("w1"))
    assert worker.running
    worker.stop()
    assert not worker.running

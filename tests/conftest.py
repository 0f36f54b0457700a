"""Fixtures for integration tests: real redis-server, zfs-fuse pools, namespaced nodes with sshd, real
Celery workers, and a local Sentry sink. See tests/harness/ for the pieces.

Integration fixtures need root and the zfs-fuse, redis-server, openssh-server and iproute2 packages.
Without them they skip, except under CI=true where they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
import redis
from harness import (
    NodeFactory,
    NodeNetwork,
    PoolFactory,
    RedisServer,
    SentrySink,
    WorkerFactory,
    ZfsFuse,
)
from harness.env import require
from harness.netns import RUN_DIR
from harness.openzfs import ImageBuild, image_missing
from harness.proc import ensure_sbin_on_path, make_private_dir
from harness.zfs import sweep_stale_pools, sweep_stale_state_dirs

REQUIRED_BINARIES = (
    "zfs-fuse",
    "zpool",
    "zfs",
    "redis-server",
    "sshd",
    "ssh",
    "ssh-keygen",
    "ip",
    "truncate",
    "mount",
    "umount",
    "stat",
)
INTEGRATION_DIR = Path(__file__).parent / "integration"
OPENZFS_DIR = Path(__file__).parent / "openzfs"
IMAGE_BUILD = pytest.StashKey[ImageBuild]()


def pytest_configure(config: pytest.Config) -> None:
    ensure_sbin_on_path()  # zfs, zpool, ip and sshd live in sbin; workers inherit this PATH too


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test, marked or not. The OpenZFS tests run last,
    and where their guest image is missing it is built in the background meanwhile (harness.openzfs)."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
    guest = [i for i in items if OPENZFS_DIR in Path(str(i.path)).parents]
    if not guest:
        return
    items[:] = [i for i in items if i not in set(guest)] + guest
    if image_missing():
        build = ImageBuild(Path(make_private_dir(RUN_DIR)) / f"openzfs-build-{os.getpid()}.log").start()
        config.stash[IMAGE_BUILD] = build
        print(f"\nopenzfs guest: no image yet; building it in the background ({build.log_path})", file=sys.stderr)


def pytest_unconfigure(config: pytest.Config) -> None:
    build = config.stash.get(IMAGE_BUILD, None)
    if build is not None:
        build.stop()


@pytest.fixture(scope="session")
def openzfs_image(request: pytest.FixtureRequest) -> None:
    """The guest image exists: waits for the background build, which fails the test loudly if it failed."""
    build = request.config.stash.get(IMAGE_BUILD, None)
    if build is not None:
        seconds = build.wait()
        print(f"\nopenzfs guest: image built in {seconds:.0f}s (beside the other tests)", file=sys.stderr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell at teardown whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed_report(request: pytest.FixtureRequest) -> pytest.TestReport | None:
    for when in ("call", "setup"):
        report = getattr(request.node, f"rep_{when}", None)
        if report is not None and report.failed:
            return report
    return None


def _attach_logs(request: pytest.FixtureRequest, title: str, text: str) -> None:
    """Show logs next to the failure in pytest's report."""
    report = _failed_report(request)
    if report is None or not text.strip():
        return
    report.sections.append((title, text))  # printed under the failure, in CI's output too


def integration_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)} (apt-get install zfs-fuse redis-server openssh-server iproute2)")
    if not Path("/dev/fuse").exists():
        problems.append("no /dev/fuse (zfs-fuse needs FUSE)")
    return problems


def require_integration() -> None:
    require("integration environment", integration_problems())


@pytest.fixture
def app(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    """The package's Celery app in this process, pointed at the test Redis (for sending tasks directly)."""
    from hoster_tasks.celery_app import app as celery_app

    if celery_app.conf.broker_url != redis_server.url:
        celery_app.conf.update(broker_url=redis_server.url, result_backend=redis_server.url)
        celery_app._local.__dict__.pop("backend", None)  # drop any backend built for the old URL
        celery_app._pool = None
    return celery_app


@pytest.fixture(scope="session")
def integration_env() -> None:
    """Skips (fails under CI=true) when root or the required programs are missing."""
    require_integration()


@pytest.fixture(scope="session")
def zfs_fuse(integration_env: None) -> Iterator[ZfsFuse]:
    """A running zfs-fuse daemon (started here if none ran; stopped at the end only if started here)."""
    daemon = ZfsFuse(make_private_dir(RUN_DIR) / f"zfs-{os.getpid()}")
    try:
        daemon.ensure()
        sweep_stale_pools()  # pools of earlier, killed runs (never a live run's)
        sweep_stale_state_dirs(RUN_DIR)
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def pool_factory(zfs_fuse: ZfsFuse, tmp_path: Path) -> Iterator[PoolFactory]:
    """`pool_factory(size="4G") -> Pool`: a fresh pool on a sparse file; destroyed after the test."""
    factory = PoolFactory(tmp_path / "pools", zfs_fuse.mount_root)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def test_network(integration_env: None) -> Iterator[NodeNetwork]:
    """The bridge (`.gateway` is its address), client key pair and known_hosts shared by all nodes."""
    network = NodeNetwork()
    try:
        network.start()
        yield network
    finally:
        network.close()


@pytest.fixture
def node_factory(
    test_network: NodeNetwork, pool_factory: PoolFactory, request: pytest.FixtureRequest
) -> Iterator[NodeFactory]:
    """`node_factory("name") -> Node`: a namespace with its own address and sshd; removed after the test.
    (It depends on pool_factory only so that nodes, and whatever runs in them, go before the pools.)"""
    factory = NodeFactory(test_network)
    yield factory
    _attach_logs(request, "sshd logs", factory.log_tails())
    factory.cleanup()


@pytest.fixture(scope="session")
def redis_server(test_network: NodeNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Shared redis-server on 127.0.0.1 and the bridge address; `.url` works from every namespace.
    Tests that kill or restart Redis must use `redis_factory` instead."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), bind=("127.0.0.1", test_network.gateway))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Client of the shared server, emptied (FLUSHALL) before the test; decode_responses=True."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_factory(test_network: NodeNetwork, tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """`redis_factory() -> RedisServer`: a private, started instance this test may kill or restart."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", bind=("127.0.0.1", test_network.gateway))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def worker_factory(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    node_factory: NodeFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[WorkerFactory]:
    """`worker_factory(node, env) -> Worker`: a real `python -m hoster_tasks worker`, ready when returned.
    Redis is flushed before the test; workers are stopped after it (before its nodes and pools go), and
    their logs are shown if it failed."""
    factory = WorkerFactory(redis_server.url, tmp_path / "workers")
    yield factory
    factory.cleanup()
    _attach_logs(request, "worker logs", factory.log_tails())


@pytest.fixture
def sentry_sink() -> Iterator[SentrySink]:
    """Local Sentry: `.dsn` (127.0.0.1), `.listen_on(test_network.gateway)` for workers in namespaces."""
    sink = SentrySink()
    yield sink
    sink.close()

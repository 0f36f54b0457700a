"""Fixtures for the tests on real OpenZFS 2.3: a QEMU guest (tests/harness/openzfs.py) booted once per
session from the image `scripts/openzfs-guest.sh build` cached (scripts/bootstrap.sh builds it), with this
checkout's code copied in; pools, a real worker inside the guest and the CLI on the host.

Every test here is marked `openzfs`. Without root, QEMU or the image the tests skip, except under CI=true
where they fail: CI must never pass by skipping. A boot failure fails with the serial console's tail.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from harness import RedisServer
from harness.cli import CliFn, cli_runner
from harness.env import require
from harness.openzfs import Guest, GuestPoolFactory, GuestWorkerFactory, guest_problems, image_dir

OPENZFS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/openzfs is an openzfs test, marked or not."""
    for item in items:
        if OPENZFS_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.openzfs)


def _attach(request: pytest.FixtureRequest, title: str, text: Callable[[], str]) -> None:
    """Show `text()` under the failure in pytest's report (rep_* are kept by tests/conftest.py)."""
    for when in ("call", "setup"):
        report = getattr(request.node, f"rep_{when}", None)
        if report is not None and report.failed:
            try:
                body = text()
            except Exception as exc:  # noqa: BLE001 - the report must not hide the test's own failure
                body = f"(could not fetch: {exc})"
            if body.strip():
                report.sections.append((title, body))
            return


@pytest.fixture(scope="session")
def openzfs_guest(
    openzfs_image: None, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    """The running guest (booted once per session; `.boot_seconds`), its 10.0.2.100:6379 forwarded to the
    session's redis_server, this checkout's hoster_tasks/ copied in. Powered off at the end."""
    require("OpenZFS guest", guest_problems())
    assert redis_server.port is not None
    guest = Guest(image_dir(), tmp_path_factory.mktemp("openzfs-guest"), redis_port=redis_server.port)
    try:
        guest.start()
        print(f"\nopenzfs guest: SSH after {guest.boot_seconds:.0f}s", file=sys.stderr)
        started = time.monotonic()
        guest.copy_project()
        guest.ensure_pool_disk()
        print(f"openzfs guest: project copied in {time.monotonic() - started:.0f}s", file=sys.stderr)
        yield guest
    finally:
        guest.stop()


@pytest.fixture
def ozfs_guest(openzfs_guest: Guest, redis_server: RedisServer) -> Guest:
    """The session's guest, its Redis forward reset to the session's redis_server."""
    assert redis_server.port is not None
    openzfs_guest.redis_target(redis_server.port)
    return openzfs_guest


@pytest.fixture
def ozfs_pools(ozfs_guest: Guest) -> Iterator[GuestPoolFactory]:
    """`ozfs_pools(size="2G", **pool_props) -> GuestPool`: a fresh pool in the guest; destroyed after the test."""
    factory = GuestPoolFactory(ozfs_guest)
    yield factory
    factory.cleanup()


@pytest.fixture
def ozfs_worker_factory(
    ozfs_guest: Guest,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    ozfs_pools: GuestPoolFactory,
    request: pytest.FixtureRequest,
) -> Iterator[GuestWorkerFactory]:
    """`ozfs_worker_factory(node_name, env) -> GuestWorker`: a real worker in the guest, ready when returned.
    Redis is flushed before the test (redis_client); workers stop after it, before its pools go; their
    logs are shown if it failed."""
    factory = GuestWorkerFactory(ozfs_guest, redis_server.url)
    yield factory
    _attach(request, "guest worker logs", factory.log_tails)
    factory.cleanup()


@pytest.fixture
def cli(redis_server: RedisServer) -> CliFn:
    """`cli("snapshot", "list-all", env={...})`: the real `hoster-tasks` command on the host (TCG is slow:
    it waits longer than the zfs-fuse tier's)."""
    return cli_runner(redis_server.url, wait_seconds=240, default_timeout=300)

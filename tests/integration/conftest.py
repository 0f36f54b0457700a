"""The `cli` fixture: the real `hoster-tasks` command, run as a user runs it (the `app` fixture is in
tests/conftest.py)."""

from __future__ import annotations

import pytest
from harness import RedisServer
from harness.cli import CliFn, cli_runner


@pytest.fixture
def cli(redis_server: RedisServer) -> CliFn:
    """`cli("snapshot", "list-all", env={...})`: the real `hoster-tasks` command, as a user runs it."""
    return cli_runner(redis_server.url, wait_seconds=90, default_timeout=120)

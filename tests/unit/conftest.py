"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HOSTER_* variable from the calling environment leaks into a test."""
    for key in list(os.environ):
        if key.upper().startswith("HOSTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOSTER_NODE_NAME", "node-a")
    yield


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own (harness.RedisServer); skipped without one, failed under CI=true."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (CI=true: failing instead of skipping)")
        pytest.skip("redis-server is not installed")
    from harness import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()

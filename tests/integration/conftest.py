"""The `cli` fixture: the real `hoster-tasks` command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from harness import RedisServer
from scenario import PROJECT_ROOT

CliFn = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(redis_server: RedisServer) -> CliFn:
    """`cli("snapshot", "list-all", env={...})`: the real `hoster-tasks` command, as a user runs it."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTER_")}
        full_env.update({"HOSTER_REDIS_URL": redis_server.url, "HOSTER_TASK_WAIT_SECONDS": "90"})
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "hoster_tasks", *args],
            env=full_env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def app(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    """The package's Celery app in this process, pointed at the test Redis (for sending tasks directly)."""
    from hoster_tasks.celery_app import app as celery_app

    if celery_app.conf.broker_url != redis_server.url:
        celery_app.conf.update(broker_url=redis_server.url, result_backend=redis_server.url)
        celery_app._local.__dict__.pop("backend", None)  # drop any backend built for the old URL
        celery_app._pool = None
    return celery_app

"""The real `hoster-tasks` command, run as a user runs it (the `cli` fixtures of the test tiers)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CliFn = Callable[..., subprocess.CompletedProcess[str]]


def cli_runner(redis_url: str, wait_seconds: float, default_timeout: float) -> CliFn:
    """`run("snapshot", "list-all", env={...})`: the CLI against `redis_url`, without the caller's own
    HOSTER_* settings; it waits at most `wait_seconds` for a task (HOSTER_TASK_WAIT_SECONDS)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = default_timeout
            ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTER_")}
        full_env.update({"HOSTER_REDIS_URL": redis_url, "HOSTER_TASK_WAIT_SECONDS": str(wait_seconds)})
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "hoster_tasks", *args], env=full_env, cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    return run

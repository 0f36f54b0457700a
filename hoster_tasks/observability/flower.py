"""Flower against the broker, authentication required (its HTTP API is off without it, and should be)."""

from __future__ import annotations

import os
import sys

from hoster_tasks.errors import ConfigError


def flower_argv(address: str, port: int, basic_auth: str | None) -> list[str]:
    auth = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth or ":" not in auth:
        raise ConfigError("Flower needs authentication: --basic-auth user:password or FLOWER_BASIC_AUTH")
    return [
        sys.executable, "-m", "celery", "-A", "hoster_tasks.celery_app", "flower",
        f"--address={address}", f"--port={port}", f"--basic-auth={auth}",
    ]


def run_flower(address: str, port: int, basic_auth: str | None) -> int:
    argv = flower_argv(address, port, basic_auth)
    os.execv(argv[0], argv)  # replace this process: signals go straight to Flower
    return 0

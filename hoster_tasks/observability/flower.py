"""Flower against the broker, authentication required (its HTTP API is off without it, and should be)."""

from __future__ import annotations

import os
import sys

from hoster_tasks.errors import ConfigError


def flower_argv(address: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "hoster_tasks.celery_app", "flower",
        f"--address={address}", f"--port={port}",
    ]


def flower_env(basic_auth: str | None) -> dict[str, str]:
    """The password goes to Flower through its environment (FLOWER_BASIC_AUTH), never on a command line."""
    auth = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth or ":" not in auth:
        raise ConfigError("Flower needs authentication: --basic-auth user:password or FLOWER_BASIC_AUTH")
    # Flower splits the value on commas (several user:password pairs): each one must have both halves, or a
    # comma inside a password would leave an entry with an empty password or none at all
    for entry in auth.split(","):
        user, _, password = entry.partition(":")
        if not user or not password:
            raise ConfigError(
                "Flower basic auth must be user:password[,user:password...] with a non-empty user and password "
                "(a password cannot contain ',')"
            )
    return {**os.environ, "FLOWER_BASIC_AUTH": auth}


def run_flower(address: str, port: int, basic_auth: str | None) -> int:
    env = flower_env(basic_auth)
    argv = flower_argv(address, port)
    os.execve(argv[0], argv, env)  # replace this process: signals go straight to Flower
    return 0

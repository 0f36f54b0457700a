"""The file named by HOSTER_CONFIG (TOML), read the same way by the typed settings (settings.py) and by the
CLI's light path (light_client.py), which must not load pydantic; and the default both need."""

from __future__ import annotations

import os
from typing import Any

from hoster_tasks.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def config_file_values() -> dict[str, Any]:
    """The file's settings that the environment does not set: env wins whole (a table given in the
    environment replaces the file's, it is not merged into it). {} without HOSTER_CONFIG."""
    path = os.environ.get("HOSTER_CONFIG")
    if not path:
        return {}
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return {k: v for k, v in data.items() if f"HOSTER_{k.upper()}" not in os.environ}

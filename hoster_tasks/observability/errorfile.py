"""The seed's alert signal: `<error_dir>/ERROR_<name>` exists while a replication is failing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hoster_tasks.names import validate_node_name


def error_file(error_dir: Path, name: str) -> Path:
    return Path(error_dir) / f"ERROR_{validate_node_name(name)}"


def write_error_file(error_dir: Path, name: str, text: str) -> Path:
    path = error_file(error_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ERROR_")
    with os.fdopen(fd, "w") as fh:
        fh.write(text.rstrip() + "\n")
    os.replace(tmp, path)
    return path


def clear_error_file(error_dir: Path, name: str) -> None:
    error_file(error_dir, name).unlink(missing_ok=True)

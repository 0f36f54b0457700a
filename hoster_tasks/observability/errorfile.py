"""The seed's alert signal: `<error_dir>/ERROR_<name>` exists while a replication job is failing.

One file per replication job: `<name>` is the job's script name, `to_<endpoint name>` by default (the
endpoint's configured name even when the job was given its host). The file lists one line per failing
dataset (`<dataset>: <error>`); a dataset's success removes its own line only, and the file goes when no
line is left, so one VM's success never hides another VM's failure. A failure of the job as a whole (no
dataset known yet) is the line `JOB_LINE`.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from hoster_tasks.names import validate_node_name

JOB_LINE = "(job)"


def error_name(endpoint_name: str, script_name: str | None) -> str:
    return script_name or f"to_{endpoint_name}"


def error_file(error_dir: Path, name: str) -> Path:
    return Path(error_dir) / f"ERROR_{validate_node_name(name)}"


def read_errors(error_dir: Path, name: str) -> dict[str, str]:
    try:
        text = error_file(error_dir, name).read_text()
    except FileNotFoundError:
        return {}
    entries = {}
    for line in text.splitlines():
        key, sep, message = line.partition(": ")
        if line.strip():
            entries[key if sep else JOB_LINE] = message if sep else line
    return entries


def update_errors(error_dir: Path, name: str, failed: Mapping[str, str], succeeded: Iterator[str] | list[str]) -> None:
    """Record `failed` (dataset -> error) and clear the lines of `succeeded`, under a file lock (two jobs of
    one name may end at once)."""
    with _locked(error_dir, name):
        entries = read_errors(error_dir, name)
        for ds in succeeded:
            entries.pop(ds, None)
        entries.update({ds: " ".join(msg.split()) for ds, msg in failed.items()})
        _write(error_file(error_dir, name), entries)


def write_error_file(error_dir: Path, name: str, dataset: str, text: str) -> None:
    update_errors(error_dir, name, {dataset: text}, [])


def clear_error_file(error_dir: Path, name: str, dataset: str) -> None:
    update_errors(error_dir, name, {}, [dataset])


@contextmanager
def _locked(error_dir: Path, name: str) -> Iterator[None]:
    path = error_file(error_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _write(path: Path, entries: Mapping[str, str]) -> None:
    if not entries:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ERROR_")
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{ds}: {msg}\n" for ds, msg in sorted(entries.items()))
    os.replace(tmp, path)

"""Flower against the broker, authentication required (its HTTP API is off without it, and should be).

Its tasks page is the operator's screen: the columns include args, kwargs, result and exception, and
`format_task` (loaded through flowerconfig.py) starts a replication row's args with "<vm> → <endpoint>" and
shortens its exception to the error's type and the failing command's stderr.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path
from typing import Any

from hoster_tasks.errors import ConfigError
from hoster_tasks.observability.status import error_summary

TASKS_COLUMNS = "name,uuid,state,args,kwargs,result,exception,received,runtime,worker"
CONFIG_FILE = Path(__file__).with_name("flowerconfig.py")

# where each public replication task names its dataset (or VM) and endpoint in its positional args
_DATASET_ENDPOINT = {"hoster.replication.step": (1, 2), "hoster.replication.finish": (1, 2),
                     "hoster.replication.chain_failed": (1, 2)}
_VM_ENDPOINT = {"hoster.replication.replicate": (0, 1)}
_EXCEPTION_REPR = re.compile(r"^(?P<type>[A-Za-z_]\w*)\((?P<args>.*)\)$", re.DOTALL)


def flower_argv(address: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "hoster_tasks.celery_app", "flower",
        f"--address={address}", f"--port={port}", f"--conf={CONFIG_FILE}",
    ]


def _literal(text: str | None) -> Any:
    """A repr Celery sent back as a value; None where it is not one (Celery truncates long reprs)."""
    try:
        return ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def row_label(name: str | None, args: str | None) -> str | None:
    """"<vm> → <endpoint>" for a replication task's args repr, or None for any other task."""
    positions = _DATASET_ENDPOINT.get(name or "") or _VM_ENDPOINT.get(name or "")
    values = _literal(args)
    if positions is None or not isinstance(values, (list, tuple)) or len(values) <= max(positions):
        return None
    what, endpoint = (values[i] for i in positions)
    if not isinstance(what, str) or not isinstance(endpoint, str):
        return None
    vm = what.rsplit("/", 1)[-1]  # a Hoster VM is the last component of its dataset
    return f"{vm} → {endpoint}" if vm == what else f"{vm} → {endpoint} ({what})"


def short_exception(text: str | None, width: int = 160) -> str | None:
    """`DatasetNotFound('[t] ssh ... exited 1: cannot open ...')` -> "DatasetNotFound: cannot open ...": the
    ssh/zfs argv says nothing in a table row (the task's page keeps the whole traceback)."""
    match = _EXCEPTION_REPR.match(text or "")
    message = _literal(match["args"]) if match else None
    if isinstance(message, tuple):  # a command's error is (argv, exit code, stderr, host): its first text
        message = next((m for m in message if isinstance(m, str)), None)
    if match is None or not isinstance(message, str):
        return text
    return f"{match['type']}: {error_summary(message, width)}"


def format_task(task: Any) -> Any:
    """Flower's `format_task` hook (a copy of each task, before a page or the tasks table shows it). Never
    raises: Flower would log the row as failed to format and show it unformatted."""
    label = row_label(getattr(task, "name", None), getattr(task, "args", None))
    if label is not None:
        task.args = f"{label} · {task.args}"  # the label first, the arguments still all there
    if getattr(task, "exception", None):
        task.exception = short_exception(task.exception)
    return task


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

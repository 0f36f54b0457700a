"""Timing probes for `python bench/replication.py --trace`; never loaded otherwise.

The bench starts the worker with PYTHONPATH=bench/trace and BENCH_TRACE_FILE=<file>; Python imports this
module at start-up. It wraps, without changing what they do, the places where a replication spends its
time: every local command (`LocalShell.run`), every control command over SSH (`SshShell._run_on`, noting
the ones that had to open the Fabric connection first), each data pipeline (`run_pipeline`), the dataset locks
(acquire/release) and each Celery task (prerun/postrun). One JSON line per event goes to the trace file.
"""

from __future__ import annotations

import functools
import json
import os
import time
import types
from typing import Any

_PATH = os.environ.get("BENCH_TRACE_FILE")
# per process, not per thread: a prefork child runs one task at a time, and a task's commands may run in
# helper threads (both sides at once), which must count for that task
_state = types.SimpleNamespace(task=None)


def _write(event: dict[str, Any]) -> None:
    event.setdefault("pid", os.getpid())
    event.setdefault("task", getattr(_state, "task", None))
    line = json.dumps(event, default=str) + "\n"
    fd = os.open(str(_PATH), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines of concurrent processes never mix
    finally:
        os.close(fd)


def _timed(kind: str, describe: Any) -> Any:
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            extra = describe(*args, **kwargs)
            t0 = time.time()
            p0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _write({"kind": extra.pop("kind", kind), "t": t0, "dur": time.perf_counter() - p0, **extra})

        return inner

    return wrap


def _argv(args: Any) -> str:
    return " ".join(str(a) for a in args)[:200]


def _install() -> None:
    from celery import signals

    from hoster_tasks import locks
    from hoster_tasks.replication import replicator
    from hoster_tasks.zfs import shell

    shell.LocalShell.run = _timed("local", lambda self, argv, *a, **k: {"what": _argv(argv)})(  # type: ignore[method-assign]
        shell.LocalShell.run
    )
    shell.SshShell._run_on = _timed(  # type: ignore[method-assign]
        "ssh",
        lambda self, conn, argv, *a, **k: {"what": _argv(argv),
                                           "kind": "ssh" if conn.is_connected else "ssh+connect"},
    )(shell.SshShell._run_on)
    replicator.run_pipeline = _timed(  # type: ignore[attr-defined]
        "pipeline", lambda send, receive, *a, **k: {"what": _argv(send.argv)}
    )(replicator.run_pipeline)
    locks.DatasetLock.acquire = _timed("lock", lambda self: {"what": f"acquire {self.key}"})(  # type: ignore[method-assign]
        locks.DatasetLock.acquire
    )
    locks.DatasetLock.release = _timed("lock", lambda self: {"what": f"release {self.key}"})(  # type: ignore[method-assign]
        locks.DatasetLock.release
    )

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id: str, task: Any, **_: Any) -> None:
        _state.task = task_id
        _state.started = (time.time(), time.perf_counter())
        _write({"kind": "task-start", "t": time.time(), "dur": 0.0, "what": task.name})

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id: str, task: Any, state: str | None = None, **_: Any) -> None:
        t0, p0 = getattr(_state, "started", (time.time(), time.perf_counter()))
        _write({"kind": "task", "t": t0, "dur": time.perf_counter() - p0, "what": f"{task.name} {state}"})
        _state.task = None


if _PATH:
    try:
        _install()
    except Exception as exc:  # noqa: BLE001 - a probe must never stop the worker from starting
        _write({"kind": "trace-error", "t": time.time(), "dur": 0.0, "what": repr(exc)})

"""What the local benches share (bench/snapshots.py, bench/queue_latency.py): a bed of the test harness's
real parts on this machine, and a teardown that a second Ctrl-C cannot interrupt.

Imported by name from the bench folder (a script's own folder is first on sys.path): not `queue`, `common`
or any other name the standard library or a dependency might also use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import PoolFactory, RedisServer, WorkerFactory, ZfsFuse
from harness.netns import RUN_DIR
from harness.proc import make_private_dir
from harness.zfs import sweep_stale_pools, sweep_stale_state_dirs


def bench_module(name: str) -> Any:
    """A sibling bench script as a module, by path (the bench folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class LocalBed:
    workdir: Path
    redis_server: RedisServer
    pools: PoolFactory
    workers: WorkerFactory


def local_bed(stack: contextlib.ExitStack, prefix: str) -> LocalBed:
    """A work dir, the machine's zfs-fuse daemon (started only if none runs), a private redis-server, and
    factories for pools and workers; each is undone by `stack`, in reverse order."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, workdir, True)
    daemon = ZfsFuse(make_private_dir(RUN_DIR) / f"zfs-{os.getpid()}")
    stack.callback(daemon.close)
    daemon.ensure()
    sweep_stale_pools()
    sweep_stale_state_dirs(RUN_DIR)
    redis_server = RedisServer(workdir / "redis")
    stack.callback(redis_server.stop)
    redis_server.start()
    pools = PoolFactory(workdir / "pools", daemon.mount_root)
    stack.callback(pools.cleanup)
    workers = WorkerFactory(redis_server.url, workdir / "workers")
    stack.callback(workers.cleanup)
    return LocalBed(workdir, redis_server, pools, workers)


def on_signals_interrupt() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so a bench stopped either way still cleans up."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tear_down(stack: contextlib.ExitStack, say: Callable[[str], None], what: str) -> BaseException | None:
    """Close `stack` with Ctrl-C and SIGTERM ignored (a second Ctrl-C must not leave pools behind); the
    cleanup's own error, if any."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say(f"cleaning up ({what})")
    problem: BaseException | None = None
    try:
        stack.close()
    except Exception as exc:  # noqa: BLE001 - reported; the bench's own failure stays the first
        say(f"cleanup problem: {exc}")
        problem = exc
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return problem

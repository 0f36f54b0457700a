"""Real `python -m hoster_tasks worker` processes, one per node, optionally inside the node's namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from .netns import Node
from .proc import HarnessError, stop_process, tail, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Inherited variables that would leak a developer's own configuration into the worker.
_SCRUB_PREFIXES = ("HOSTER_", "SENTRY_")


def worker_available() -> bool:
    """True once the application has its `python -m hoster_tasks` entry point."""
    return (PROJECT_ROOT / "hoster_tasks" / "__main__.py").exists()


def _env_value(value: Any) -> str:
    """Strings as they are; lists, dicts, numbers and booleans as JSON (HOSTER_DATASETS='["pool/vm"]')."""
    return value if isinstance(value, str) else json.dumps(value)


class Worker:
    """One worker process (its own process group, so stop() also reaches the Celery pool children)."""

    def __init__(self, node_name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.node_name = node_name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def redis_url(self) -> str:
        return self.env["HOSTER_REDIS_URL"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 60) -> Worker:
        """Wait until the worker registered its node key in Redis (it writes it once it consumes)."""
        from hoster_tasks import keys  # the application's own key scheme

        key = keys.node(self.node_name)
        with redis.Redis.from_url(self.redis_url, socket_timeout=2) as client:

            def ready() -> bool:
                if not self.running:
                    raise HarnessError(
                        f"worker {self.node_name} exited with {self.returncode} before it was ready:\n{self.log_tail()}"
                    )
                try:
                    return bool(client.exists(key))
                except redis.RedisError:
                    return False

            wait_until(
                ready, timeout, f"worker {self.node_name} to write {key}", interval=0.2,
                on_timeout=lambda: f"worker log tail ({self.log_path}):\n{self.log_tail()}",
            )  # fmt: skip
        return self

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (Celery warm shutdown), SIGKILL to the whole process group after `timeout`."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout=timeout, group=True)

    def kill(self) -> int | None:
        """Simulate a crash: SIGKILL the whole process group at once."""
        if self.proc is None:
            return None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)


class WorkerFactory:
    """Starts workers for a test; `cleanup()` stops them all."""

    def __init__(self, redis_url: str, tmp_dir: Path) -> None:
        self.redis_url = redis_url
        self.tmp_dir = tmp_dir
        self.workers: list[Worker] = []

    def __call__(
        self,
        node: Node | str,
        env: Mapping[str, Any] | None = None,
        *,
        args: Sequence[str] = (),
        netns: bool = True,
        wait: bool = True,
        timeout: float = 60,
    ) -> Worker:
        """Start a worker for `node` (a Node runs inside its namespace unless netns=False; a plain name
        runs in the root namespace). `env` overrides the defaults HOSTER_REDIS_URL, HOSTER_NODE_NAME
        and HOSTER_ERROR_DIR; non-string values are JSON-encoded."""
        name = node if isinstance(node, str) else node.name
        argv = [sys.executable, "-m", "hoster_tasks", "worker", *args]
        if isinstance(node, Node) and netns:
            argv = node.ns_argv(argv)
        workdir = self.tmp_dir / f"worker-{name}-{len(self.workers)}"
        worker = Worker(name, argv, self._env(name, workdir, env or {}), workdir / "worker.log")
        self.workers.append(worker)  # registered before start: cleanup covers a failed start
        worker.start()
        if wait:
            worker.wait_ready(timeout)
        return worker

    def _env(self, name: str, workdir: Path, overrides: Mapping[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
        env.update(
            PYTHONUNBUFFERED="1",
            HOSTER_REDIS_URL=self.redis_url,
            HOSTER_NODE_NAME=name,
            HOSTER_ERROR_DIR=str(workdir / "errors"),
        )
        env.update({k: _env_value(v) for k, v in overrides.items()})
        Path(env["HOSTER_ERROR_DIR"]).mkdir(parents=True, exist_ok=True)
        return env

    def log_tails(self, lines: int = 80) -> str:
        return "\n".join(
            f"----- worker {w.node_name} (exit {w.returncode}), {w.log_path} -----\n{w.log_tail(lines)}"
            for w in self.workers
        )

    def cleanup(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()

"""A private redis-server owned by the test run (foreground process, no persistence)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .proc import HarnessError, free_port, stop_process, tail, wait_until


class RedisServer:
    """One redis-server process.

    `bind` lists the addresses to listen on; the first non-loopback one (e.g. the test bridge) goes into
    `.url` so the same URL works from the root namespace and from inside the node namespaces.
    """

    def __init__(self, workdir: Path, bind: Sequence[str] = ("127.0.0.1",), port: int | None = None) -> None:
        self.workdir = workdir
        self.bind = list(bind)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def host(self) -> str:
        public = [a for a in self.bind if not a.startswith("127.")]
        return (public or self.bind)[0]

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def url_for(self, host: str, db: int = 0) -> str:
        return f"redis://{host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("decode_responses", True)
        kw.setdefault("socket_timeout", 5)
        return redis.Redis.from_url(self.url, **kw)

    def ping(self) -> bool:
        try:
            # No retries: redis-py's default backoff makes a dead server cost seconds per check.
            with redis.Redis(host=self.host, port=self.port or 0, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 15) -> None:
        """Start on the remembered port, or on a free one (retrying if another process takes it first)."""
        if self.running:
            return
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            if self._start_on(port, timeout):
                self.port = port
                return
            if attempt + 1 == attempts:
                raise HarnessError(f"redis-server did not start on port {port}:\n{tail(self.log_path)}")

    def _start_on(self, port: int, timeout: float) -> bool:
        argv = [
            "redis-server", "--port", str(port), "--bind", *self.bind,
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--dir", str(self.workdir), "--logfile", "",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = port
        try:
            wait_until(lambda: self.ping() or self.proc is None or self.proc.poll() is not None, timeout, "redis")
        except HarnessError:
            self.kill()
            raise HarnessError(f"redis-server on port {port} did not answer PING:\n{tail(self.log_path)}") from None
        if self.running:
            return True
        self.proc = None  # exited: most likely the port was taken
        return False

    def stop(self) -> None:
        """Graceful stop (SIGTERM: redis shuts down cleanly), SIGKILL after 10 s."""
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None

    def kill(self) -> None:
        """Crash it: SIGKILL, no shutdown."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (all data is lost: no persistence)."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

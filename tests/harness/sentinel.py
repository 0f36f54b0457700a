"""Redis Sentinel for the tests: a master, a replica and one `redis-sentinel` (Debian's), on free ports.

One sentinel with quorum 1 is enough to test the clients: `SENTINEL FAILOVER` (what the tests use) needs
no agreement. Everything binds the loopback and the test bridge, and announces the bridge address, so the
master the sentinel names is reachable from the node namespaces too.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .proc import HarnessError, free_port, stop_process, tail, wait_until
from .redis_server import RedisServer

MASTER_NAME = "hoster"


def sentinel_binary() -> str | None:
    return shutil.which("redis-sentinel")


class ReplicaServer(RedisServer):
    """A redis-server replicating `master` (optional: a master needs no replicaof)."""

    def __init__(self, workdir: Path, bind: Sequence[str], master: RedisServer | None = None) -> None:
        super().__init__(workdir, bind=bind)
        self.master = master

    def _start_on(self, port: int, timeout: float) -> bool:
        argv = [
            "redis-server", "--port", str(port), "--bind", *self.bind, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--dir", str(self.workdir), "--logfile", "",
            "--replica-announce-ip", self.host,
        ]  # fmt: skip
        if self.master is not None:
            argv += ["--replicaof", self.master.host, str(self.master.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = port
        try:
            wait_until(lambda: self.ping() or not self.running, timeout, "redis")
        except HarnessError:
            self.kill()
            raise
        return self.running

    def role(self) -> str:
        with redis.Redis(host=self.host, port=self.port or 0, socket_timeout=2, retry=Retry(NoBackoff(), 0)) as c:
            return str(c.info("replication")["role"])


class SentinelSetup:
    """`start()`: master, replica (in sync), sentinel watching them. `.url`: our sentinel:// URL."""

    def __init__(self, workdir: Path, bind: Sequence[str]) -> None:
        self.workdir = workdir
        self.bind = list(bind)
        self.master = ReplicaServer(workdir / "a", self.bind)
        self.replica = ReplicaServer(workdir / "b", self.bind, master=self.master)
        self.sentinel_port = 0
        self.sentinel_proc: subprocess.Popen[bytes] | None = None
        self.sentinel_log = workdir / "sentinel.log"

    @property
    def host(self) -> str:
        return self.master.host

    @property
    def url(self) -> str:
        return f"sentinel://{self.host}:{self.sentinel_port}/0?master_name={MASTER_NAME}"

    def start(self) -> SentinelSetup:
        binary = sentinel_binary()
        if binary is None:
            raise HarnessError("redis-sentinel is not installed (apt-get install redis-sentinel)")
        self.master.start()
        self.replica.start()
        wait_until(self._in_sync, 30, "the replica to sync with the master")
        self.sentinel_port = free_port()
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites its own config: a file of its own
        conf.write_text("\n".join([
            f"port {self.sentinel_port}", f"bind {' '.join(self.bind)}", "protected-mode no",
            f"dir {self.workdir}", f"sentinel announce-ip {self.host}",
            f"sentinel monitor {MASTER_NAME} {self.master.host} {self.master.port} 1",
            f"sentinel down-after-milliseconds {MASTER_NAME} 2000",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1", "",
        ]))  # fmt: skip
        with open(self.sentinel_log, "ab") as log:
            self.sentinel_proc = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL)
        wait_until(lambda: self._sentinel_knows_replica(), 30, "the sentinel to see master and replica",
                   on_timeout=lambda: tail(self.sentinel_log))
        return self

    def _sentinel(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.sentinel_port, socket_timeout=2, decode_responses=True,
                           retry=Retry(NoBackoff(), 0))

    def _in_sync(self) -> bool:
        try:
            with redis.Redis(host=self.replica.host, port=self.replica.port or 0, socket_timeout=2) as c:
                return c.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def _sentinel_knows_replica(self) -> bool:
        try:
            with self._sentinel() as s:
                return bool(s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME))
        except redis.RedisError:
            return False

    def current_master(self) -> tuple[str, int]:
        with self._sentinel() as s:
            host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return str(host), int(port)

    def failover(self, timeout: float = 30) -> tuple[str, int]:
        """`SENTINEL FAILOVER`: the replica is promoted, the old master becomes its replica. Returns the new
        master's address once the sentinel names it and it answers as master."""
        before = self.current_master()
        with self._sentinel() as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_until(lambda: self.current_master() != before, timeout, "the sentinel to name a new master",
                   on_timeout=lambda: tail(self.sentinel_log))
        new = self.current_master()
        server = self.master if new[1] == self.master.port else self.replica
        wait_until(lambda: server.role() == "master", timeout, "the new master to take writes")
        return new

    def log_tails(self) -> str:
        return "\n".join(f"----- {name} -----\n{tail(path)}" for name, path in
                         (("sentinel", self.sentinel_log), ("a", self.master.log_path), ("b", self.replica.log_path)))

    def stop(self) -> None:
        if self.sentinel_proc is not None:
            stop_process(self.sentinel_proc, timeout=10)
            self.sentinel_proc = None
        self.replica.stop()
        self.master.stop()

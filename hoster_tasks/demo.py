"""`make demo`: the whole system on a local sandbox, showing it working.

Starts a private redis-server, zfs-fuse with a sandbox pool of three VM datasets and a backup pool, an sshd on
127.0.0.1 as the replication target, a node worker and beat; then snapshots and replicates through the queue,
waits for beat to fire, and prints Hoster's snapshot table and the status. Everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

SANDBOX = Path(os.environ.get("HOSTER_DEMO_DIR", Path.cwd() / ".sandbox"))
_RUN = os.urandom(2).hex()  # fresh pool names per run: a pool some other mount namespace still pins is no obstacle
POOL, BACKUP = f"htdemo{_RUN}", f"htdemobk{_RUN}"
ROOT = f"{POOL}/vm-encrypted"
VMS = ("web-01", "db-01", "test-vm-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def _wait(what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.3)


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def start_redis(stack: ExitStack) -> str:
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(SANDBOX)],
        stdout=subprocess.DEVNULL,
    )
    stack.callback(proc.terminate)
    import redis

    client = redis.Redis(port=port)
    _wait("redis", lambda: _pings(client))
    return f"redis://127.0.0.1:{port}/0"


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not up yet
        return False


def start_zfs(stack: ExitStack) -> None:
    if subprocess.run(["pgrep", "-x", "zfs-fuse"], capture_output=True).returncode != 0:
        subprocess.run(["zfs-fuse"], check=True)
        stack.callback(lambda: subprocess.run(["pkill", "-x", "zfs-fuse"], check=False))
    _wait("zfs-fuse", lambda: subprocess.run(["zpool", "list"], capture_output=True).returncode == 0)
    for pool in (POOL, BACKUP):
        image = SANDBOX / f"{pool}.img"
        _run(["truncate", "-s", "2G", str(image)])
        _run(["zpool", "create", "-m", str(SANDBOX / f"{pool}-mnt"), pool, str(image)])
        stack.callback(_destroy_pool, pool, image)
    _run(["zfs", "create", ROOT])
    _run(["zfs", "create", f"{BACKUP}/vm-encrypted"])
    for vm in VMS:
        _run(["zfs", "create", f"{ROOT}/{vm}"])
        with open(SANDBOX / f"{POOL}-mnt" / "vm-encrypted" / vm / "disk0.img", "wb") as fh:
            fh.write(os.urandom(4 << 20))
    os.sync()


def _destroy_pool(pool: str, image: Path) -> None:
    """zfs-fuse may call a pool busy for a moment after its last use: retry for a while."""
    deadline = time.monotonic() + 20
    while subprocess.run(["zpool", "destroy", "-f", pool], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            print(f"demo: could not destroy pool {pool}; remove it later with `zpool destroy {pool}`")
            return
        time.sleep(1)
    image.unlink(missing_ok=True)


def start_sshd(stack: ExitStack) -> dict[str, object]:
    """A replication target on 127.0.0.1: its own host key, our client key, strict known_hosts."""
    ssh_dir = Path(tempfile.mkdtemp(prefix="hoster-demo-ssh-"))
    stack.callback(lambda: shutil.rmtree(ssh_dir, ignore_errors=True))
    host_key, client_key = ssh_dir / "host_ed25519", ssh_dir / "client_ed25519"
    for key in (host_key, client_key):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    shutil.copy(f"{client_key}.pub", ssh_dir / "authorized_keys")
    port = _free_port()
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
         "-h", str(host_key), "-o", f"AuthorizedKeysFile={ssh_dir}/authorized_keys",
         "-o", "PermitRootLogin=prohibit-password", "-o", "PidFile=none", "-o", "StrictModes=no"],
        stderr=subprocess.DEVNULL,
    )
    stack.callback(proc.terminate)
    _wait("sshd", lambda: _port_open(port))
    return {"name": "backup", "host": "127.0.0.1", "port": port, "key_file": str(client_key),
            "known_hosts": str(ssh_dir / "known_hosts"), "root_map": {ROOT: f"{BACKUP}/vm-encrypted"}}


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (zfs-fuse, sshd)", file=sys.stderr)
        return 1
    SANDBOX.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        _step("starting redis-server, zfs-fuse with a sandbox pool, and an sshd as the backup target")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTER_")}
        env["HOSTER_REDIS_URL"] = start_redis(stack)
        start_zfs(stack)
        target = start_sshd(stack)
        env.update(
            HOSTER_NODE_NAME="demo-node",
            HOSTER_DATASETS=json.dumps([ROOT]),
            HOSTER_TARGETS=json.dumps([target]),
            HOSTER_HEARTBEAT_SECONDS="1",
            HOSTER_ERROR_DIR=str(SANDBOX / "errors"),
            # demo schedule: a `frequent` snapshot and a replication every minute (UTC crontab)
            HOSTER_SNAPSHOT_SCHEDULE=json.dumps({"frequent": {"cron": "* * * * *", "stype": "frequent", "keep": 3}}),
            HOSTER_REPLICATION_SCHEDULE=json.dumps({"backup": {"cron": "* * * * *", "endpoint": "backup"}}),
        )
        logs = SANDBOX / "logs"
        logs.mkdir(exist_ok=True)
        _step(f"starting the node worker and beat (logs in {logs})")
        for name, args in (("worker", ["worker", "-c", "2"]), ("beat", ["beat"])):
            log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the stack
            stack.callback(log.close)
            proc = subprocess.Popen([sys.executable, "-m", "hoster_tasks", *args], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=SANDBOX)
            stack.callback(proc.wait, 30)  # after terminate (callbacks run last-in, first-out)
            stack.callback(proc.terminate)

        def cli(*args: str, show: bool = True) -> str:
            print(f"$ hoster-tasks {' '.join(args)}", flush=True)
            out = subprocess.run([sys.executable, "-m", "hoster_tasks", *args], env=env, text=True,
                                 capture_output=True, check=False)
            if show:
                print(out.stdout + out.stderr, end="", flush=True)
            return out.stdout

        import redis

        client = redis.Redis.from_url(env["HOSTER_REDIS_URL"])
        _wait("the worker to register", lambda: bool(client.exists("hoster:node:demo-node")))
        _step("snapshots through the queue")
        cli("snapshot", "new", "web-01")
        cli("snapshot", "all", "--stype", "hourly", "--keep", "3")
        cli("snapshot", "all", "--stype", "hourly", "--keep", "3")
        _step("replication: full then incremental in one request, over SSH with strict host keys")
        cli("vm", "replicate", "web-01", "--endpoint", "backup")
        cli("vm", "replicate-all", "--endpoint", "backup")
        _step("waiting for beat's every-minute snapshot and replication (fires at the top of the minute)")
        _wait("beat", lambda: "frequent_" in cli("snapshot", "list", "db-01", "--json", show=False), timeout=90)
        time.sleep(3)
        _step("the result")
        cli("snapshot", "list-all")
        cli("status")
    return 0


if __name__ == "__main__":
    sys.exit(main())

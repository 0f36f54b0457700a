"""`make demo`: the whole system on a local sandbox, showing it working.

Starts a private redis-server, zfs-fuse with a sandbox pool of three VM datasets and a backup pool, an sshd on
127.0.0.1 as the replication target, a node worker, beat, Flower (basic auth) and the metrics exporter; then
snapshots and replicates through the queue, fails one replication on purpose (a target whose dataset root is
missing), waits for beat to fire, and prints Hoster's snapshot table, the status and some metrics. On a
terminal it then waits for Enter, so Flower's tasks page can be looked at. Everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
        pidfile = SANDBOX / "zfs-fuse.pid"
        pidfile.unlink(missing_ok=True)  # no zfs-fuse runs: a pidfile left by a killed demo is stale, and zfs-fuse
        subprocess.run(["zfs-fuse", "--pidfile", str(pidfile)], check=True)  # refuses to start beside one
        stack.callback(_stop_pid, pidfile)  # the daemon we started, by its pid: never another's by name
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


def _stop_pid(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass  # gone already, or it never wrote its pid


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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as res:  # noqa: S310 - our own loopback URL
            return bool(res.status == 200)
    except OSError:  # refused, reset, or an HTTP error status (URLError and HTTPError are OSErrors)
        return False


def _spawn(stack: ExitStack, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
    log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the stack
    stack.callback(log.close)
    proc = subprocess.Popen([sys.executable, "-m", "hoster_tasks", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=SANDBOX)
    stack.callback(proc.wait, 30)  # after terminate (callbacks run last-in, first-out)
    stack.callback(proc.terminate)


def start_flower_and_exporter(stack: ExitStack, env: dict[str, str], logs: Path) -> dict[str, str]:
    """Flower with a fresh password (given through its environment, never a command line), and
    `metrics --serve`; both on loopback ports."""
    user, password = "demo", secrets.token_urlsafe(12)
    flower_port, metrics_port = _free_port(), _free_port()
    _spawn(stack, "flower", ["flower", "--port", str(flower_port), "--address", "127.0.0.1"],
           {**env, "FLOWER_BASIC_AUTH": f"{user}:{password}"}, logs)
    _spawn(stack, "metrics", ["metrics", "--serve", str(metrics_port)], env, logs)
    flower, metrics = f"http://127.0.0.1:{flower_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    _wait("flower", lambda: _answers(f"{flower}/healthcheck"))
    _wait("the metrics exporter", lambda: _answers(metrics))
    return {"flower": flower, "user": user, "password": password, "metrics": metrics}


def _show_metrics(url: str) -> None:
    per_vm = ("hoster_tasks_replication_error{", "hoster_tasks_replication_lag_seconds{",
              "hoster_tasks_replication_bytes_remaining{")
    print(f"$ curl {url}  (some of its lines)")
    with urllib.request.urlopen(url, timeout=10) as res:  # noqa: S310 - our own loopback URL
        text = res.read().decode()
    for line in text.splitlines():
        if (line.startswith(per_vm) and "web-01" in line) or line.startswith("hoster_tasks_node_up{"):
            print(line)


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
        # the same sshd, but a dataset root that does not exist there: every receive into it fails
        broken = {**target, "name": "broken", "root_map": {ROOT: f"{BACKUP}/missing"}}
        env.update(
            # this tree's package, whichever checkout `pip install -e` points at (the processes run in SANDBOX)
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
            HOSTER_NODE_NAME="demo-node",
            HOSTER_DATASETS=json.dumps([ROOT]),
            HOSTER_TARGETS=json.dumps([target, broken]),
            HOSTER_HEARTBEAT_SECONDS="1",
            HOSTER_ERROR_DIR=str(SANDBOX / "errors"),
            # demo schedule: a `frequent` snapshot and a replication every minute (UTC crontab)
            HOSTER_SNAPSHOT_SCHEDULE=json.dumps({"frequent": {"cron": "* * * * *", "stype": "frequent", "keep": 3}}),
            HOSTER_REPLICATION_SCHEDULE=json.dumps({"backup": {"cron": "* * * * *", "endpoint": "backup"}}),
        )
        logs = SANDBOX / "logs"
        logs.mkdir(exist_ok=True)
        _step(f"starting the node worker, beat, Flower and the metrics exporter (logs in {logs})")
        for name, args in (("worker", ["worker", "-c", "2"]), ("beat", ["beat"])):
            _spawn(stack, name, args, env, logs)
        web = start_flower_and_exporter(stack, env, logs)
        print(f"Flower:  {web['flower']}/tasks  user {web['user']}  password {web['password']}", flush=True)
        print(f"Metrics: {web['metrics']}", flush=True)

        def cli(*args: str, show: bool = True) -> str:
            print(f"$ hoster-tasks {' '.join(args)}", flush=True)
            out = subprocess.run([sys.executable, "-m", "hoster_tasks", *args], env=env, text=True,
                                 capture_output=True, check=False)
            if show:
                print(out.stdout + out.stderr, end="", flush=True)
            return out.stdout

        from hoster_tasks.redis_conn import client_from_url

        client = client_from_url(env["HOSTER_REDIS_URL"])
        _wait("the worker to register", lambda: bool(client.exists("hoster:node:demo-node")))
        _step("snapshots through the queue")
        cli("snapshot", "new", "web-01")
        cli("snapshot", "all", "--stype", "hourly", "--keep", "3")
        cli("snapshot", "all", "--stype", "hourly", "--keep", "3")
        _step("replication: full then incremental in one request, over SSH with strict host keys")
        cli("vm", "replicate", "web-01", "--endpoint", "backup")
        cli("vm", "replicate-all", "--endpoint", "backup")
        _step("a replication that fails: its error in the CLI, in status, in Flower's row and in the metrics")
        cli("vm", "replicate", "web-01", "--endpoint", "broken")
        _step("waiting for beat's every-minute snapshot and replication (fires at the top of the minute)")
        _wait("beat", lambda: "frequent_" in cli("snapshot", "list", "db-01", "--json", show=False), timeout=90)
        time.sleep(3)
        _step("the result")
        cli("snapshot", "list-all")
        cli("status")
        _show_metrics(web["metrics"])
        print(f"\nFlower's tasks page: {web['flower']}/tasks (user {web['user']}, password {web['password']}); "
              "the failed hoster.replication.step row names web-01 and broken.", flush=True)
        if sys.stdin.isatty():
            input("Press Enter to stop the demo and remove the sandbox. ")
    return 0


if __name__ == "__main__":
    sys.exit(main())

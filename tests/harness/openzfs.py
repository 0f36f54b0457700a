"""Real OpenZFS 2.3: a Debian 12 QEMU guest (TCG) that is a hoster-tasks node, with a real worker inside.

The image is built once by `scripts/openzfs-guest.sh build` (cached, keyed by its recipe; see
../shared/notes/openzfs-guest.md). Every boot runs on a qcow2 overlay of the cached root.img (never
modified) plus a blank sparse second disk, /dev/vdb, on which the pool factory makes pools from files.

Why the worker runs inside the guest, and the target is the guest's own sshd:
- The worker under test is `/opt/hoster-tasks/bin/python -m hoster_tasks worker` in the guest, running this
  checkout's code (copied in at every boot). Its LocalShell runs the real OpenZFS `zfs` binary as a child
  process, exactly as on a production node: exit codes, stderr, a `zfs send` that dies by SIGPIPE when
  the stream is cut, the parent-death signal and the watchdog killing real `zfs` processes are all the
  kernel's and OpenZFS's own. A host-side wrapper reaching the guest's `zfs` over SSH would distort that
  (a cut send then exits 255, ssh's code, instead of dying by SIGPIPE).
- The replication target is a second pool in the same guest, reached through the guest's sshd at
  127.0.0.1:22 with a key and known_hosts file inside the guest (baked into the image): the data path is
  production's own `zfs send | pv | ssh target zfs receive`, and the remote commands go through Fabric
  over real SSH to a real OpenZFS `zfs receive`.
- The worker reaches the host's test Redis through a QEMU guestfwd (10.0.2.100:6379 in the guest, allowed
  with `restrict=on`, which otherwise cuts the guest off): each connection the guest opens there runs a
  tiny forwarder on the host that connects to the Redis port named in a file, so a test may point the
  guest at another Redis (`Guest.redis_target`) without rebooting.

The CLI runs on the host, as in the zfs-fuse tests: it talks to the worker only through Redis.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from .proc import HarnessError, free_port, rand_hex, run, stop_process, tail, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "openzfs-guest.sh"
QEMU = "qemu-system-x86_64"
GUEST_REDIS_HOST = "10.0.2.100"  # the guestfwd address the guest's worker uses for Redis
GUEST_REDIS_PORT = 6379
GUEST_VENV_PYTHON = "/opt/hoster-tasks/bin/python"
GUEST_SRC = "/opt/hoster-tasks-src"  # this checkout's hoster_tasks/ and beat_schedule.py, on PYTHONPATH
GUEST_RUN = "/run/hoster-guest"  # worker dirs (logs, pid, exit code, ERROR_ files)
GUEST_POOL_FILES = "/pools"  # the ext4 on /dev/vdb holding the pools' vdev files
GUEST_MOUNT_ROOT = "/mnt"  # pool <name> is mounted at /mnt/<name>
GUEST_KEY = "/root/.ssh/id_ed25519"  # the guest worker's key for its own sshd (the replication target)
GUEST_KNOWN_HOSTS = "/root/.ssh/known_hosts"  # the guest's host keys as 127.0.0.1
HOST_KEY_ALIAS = "hoster-openzfs-guest"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Run by QEMU (slirp's guestfwd cmd:) for each connection the guest opens to 10.0.2.100:6379: stdin/stdout
# are that connection; it is relayed to 127.0.0.1:<port in the file given as argv[1]>.
FORWARDER = """\
import os, select, socket, sys
port = int(open(sys.argv[1]).read().split()[0])
sock = socket.create_connection(("127.0.0.1", port))
ends = {0: sock.fileno(), sock.fileno(): 1}
open_ = {0, sock.fileno()}
while open_:
    for fd in select.select(list(open_), [], [])[0]:
        data = os.read(fd, 65536)
        if not data:
            open_.discard(fd)
            if fd == 0:
                sock.shutdown(socket.SHUT_WR)
            else:
                os._exit(0)
            continue
        out = ends[fd]
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
"""


def image_dir() -> Path:
    """The cache directory of the current recipe (`openzfs-guest.sh path`); built or not."""
    out = run(["bash", str(BUILD_SCRIPT), "path"], timeout=30).stdout.strip()
    return Path(out)


def guest_problems() -> list[str]:
    """Why the guest cannot be booted here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    for tool in (QEMU, "qemu-img", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            problems.append(f"missing {tool} (scripts/bootstrap.sh installs qemu-system-x86 qemu-utils)")
    if not problems:
        images = image_dir()
        if not (images / "root.img").exists():
            problems.append(f"no guest image in {images} (run: bash scripts/openzfs-guest.sh build)")
    return problems


class Guest:
    """One running guest: `start()` boots it and waits for SSH; `run(argv)` runs a command in it."""

    def __init__(
        self,
        images: Path,
        workdir: Path,
        *,
        redis_port: int | None = None,
        memory_mb: int = 2048,
        cpus: int = 2,
        pool_disk: str = "16G",
    ) -> None:
        self.images = images
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.pool_disk = pool_disk
        self.key_file = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self.redis_port_file = workdir / "redis-port"
        self.ssh_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None  # qemu start to SSH answering
        self._redis_port = redis_port
        self._pools_ready = False

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 480) -> Guest:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        for name in ("root.img", "vmlinuz", "initrd.img", "id_ed25519", "ssh_host_ed25519_key.pub"):
            if not (self.images / name).exists():
                raise HarnessError(f"guest image incomplete: no {self.images / name} (bash {BUILD_SCRIPT} build)")
        shutil.copy(self.images / "id_ed25519", self.key_file)
        os.chmod(self.key_file, 0o600)
        host_key = (self.images / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"{HOST_KEY_ALIAS} {host_key[0]} {host_key[1]}\n")
        self.redis_target(self._redis_port or 1)
        forwarder = self.workdir / "redis-forward.py"
        forwarder.write_text(FORWARDER)
        overlay = self.workdir / "root.qcow2"
        disk = self.workdir / "pools.img"
        for p in (overlay, disk, self.console_log):
            p.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.images / "root.img"), str(overlay)])
        run(["truncate", "-s", self.pool_disk, str(disk)])
        for attempt in range(3):  # the free port may be taken before QEMU binds it
            self.ssh_port = free_port()
            if self._boot(overlay, disk, forwarder, timeout):
                return self
            if attempt == 2 or "hostfwd" not in tail(self.qemu_log, 20):
                break
        raise HarnessError(
            f"guest QEMU exited with {self.proc.returncode if self.proc else None} during boot\n"
            f"qemu log:\n{tail(self.qemu_log, 30)}\nserial console tail:\n{tail(self.console_log, 60)}"
        )

    def _boot(self, overlay: Path, disk: Path, forwarder: Path, timeout: float) -> bool:
        guestfwd = f"cmd:{sys.executable} {forwarder} {self.redis_port_file}"
        netdev = ",".join(
            [
                "user,id=n0,restrict=on",
                f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                f"guestfwd=tcp:{GUEST_REDIS_HOST}:{GUEST_REDIS_PORT}-{guestfwd}",
            ]
        )
        argv = [
            QEMU, "-name", "hoster-openzfs-guest",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-kernel", str(self.images / "vmlinuz"), "-initrd", str(self.images / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet",
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.console_log}",
            "-no-reboot",
        ]  # fmt: skip
        started = time.monotonic()
        with open(self.qemu_log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ssh_up() -> bool:
            if not self.running:
                raise _QemuExited()
            try:
                return self.run(["true"], check=False, timeout=20, connect_timeout=5).returncode == 0
            except HarnessError:  # timed out: sshd not answering yet
                return False

        try:
            wait_until(
                ssh_up, timeout, f"SSH of the OpenZFS guest on 127.0.0.1:{self.ssh_port}", interval=1,
                on_timeout=lambda: f"serial console tail ({self.console_log}):\n{tail(self.console_log, 60)}",
            )  # fmt: skip
        except _QemuExited:
            return False
        except HarnessError:
            self.kill()
            raise
        self.boot_seconds = time.monotonic() - started
        return True

    def stop(self, timeout: float = 30) -> None:
        """`poweroff` in the guest; QEMU killed if it has not exited after `timeout`."""
        if self.proc is None:
            return
        if self.running:
            try:
                self.run(["systemctl", "poweroff"], check=False, timeout=15)
            except HarnessError:
                pass  # the connection may hang while the guest goes down: QEMU's exit is what counts
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.run_ssh_exit()

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5, group=True)

    def run_ssh_exit(self) -> None:
        """End the SSH control master (its socket lives in the workdir)."""
        try:
            subprocess.run(
                ["ssh", *self._ssh_options(5), "-O", "exit", "root@127.0.0.1"],
                capture_output=True, check=False, timeout=10, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands --------------------------------------------------------------------------------------
    def _ssh_options(self, connect_timeout: int) -> list[str]:
        return [
            "-i", str(self.key_file), "-p", str(self.ssh_port),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", f"HostKeyAlias={HOST_KEY_ALIAS}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=10", "-o", "LogLevel=ERROR",
            # one SSH connection for all commands: a handshake costs about a second under TCG
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.workdir}/ssh-%C", "-o", "ControlPersist=300",
        ]  # fmt: skip

    def ssh_argv(self, argv: Sequence[str | os.PathLike[str]], connect_timeout: int = 10) -> list[str]:
        """The host-side argv that runs `argv` in the guest (each argument quoted exactly once)."""
        remote = shlex.join(os.fspath(a) for a in argv)
        return ["ssh", *self._ssh_options(connect_timeout), "root@127.0.0.1", "--", remote]

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        timeout: float = 120,
        input: str | bytes | None = None,
        text: bool = True,
        connect_timeout: int = 10,
    ) -> subprocess.CompletedProcess[Any]:
        """Run `argv` in the guest as root; on failure (check=True) HarnessError with argv, exit and stderr."""
        args = [os.fspath(a) for a in argv]
        try:
            proc = subprocess.run(
                self.ssh_argv(args, connect_timeout),
                input=input, capture_output=True, text=text, timeout=timeout, check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"guest command timed out after {timeout:.0f}s: {args}") from exc
        if check and proc.returncode != 0:
            out, err = proc.stdout, proc.stderr
            if isinstance(out, bytes):
                out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            raise HarnessError(
                f"guest command failed (exit {proc.returncode}): {args}\n"
                f"stdout: {(out or '').strip()[-2000:]}\nstderr: {(err or '').strip()[-2000:]}"
            )
        return proc

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """A POSIX shell script in the guest (quote what you put into it with shlex.quote)."""
        return self.run(["sh", "-euc", script], **kw)

    def zfs(self, *args: str, timeout: float = 120) -> str:
        """`zfs ARGS` in the guest; its stdout."""
        return str(self.run(["zfs", *args], timeout=timeout).stdout)

    def zpool(self, *args: str, timeout: float = 120) -> str:
        return str(self.run(["zpool", *args], timeout=timeout).stdout)

    def read_file(self, path: str) -> str:
        return str(self.run(["cat", "--", path]).stdout)

    def versions(self) -> tuple[str, str]:
        """(userland, kmod) as `zfs version` prints them: ("zfs-2.3.2-2~bpo12+2", "zfs-kmod-2.3.2-2~bpo12+2")."""
        lines = self.zfs("version").split()
        user = next(v for v in lines if v.startswith("zfs-") and not v.startswith("zfs-kmod-"))
        kmod = next(v for v in lines if v.startswith("zfs-kmod-"))
        return user, kmod

    # -- Redis -----------------------------------------------------------------------------------------
    def redis_target(self, host_port: int) -> None:
        """Point the guest's 10.0.2.100:6379 at 127.0.0.1:<host_port> on the host (new connections)."""
        self._redis_port = host_port
        tmp = self.redis_port_file.with_suffix(".tmp")
        tmp.write_text(f"{host_port}\n")
        tmp.replace(self.redis_port_file)

    @property
    def redis_url(self) -> str:
        """The URL of the host's test Redis as the guest sees it."""
        return f"redis://{GUEST_REDIS_HOST}:{GUEST_REDIS_PORT}/0"

    # -- the project -----------------------------------------------------------------------------------
    def copy_project(self, root: Path = PROJECT_ROOT) -> None:
        """This checkout's hoster_tasks/ and beat_schedule.py into GUEST_SRC (replacing an earlier copy)."""
        archive = self.workdir / "project.tar.gz"

        def skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info

        with tarfile.open(archive, "w:gz") as tar:
            tar.add(root / "hoster_tasks", "hoster_tasks", filter=skip_cache)
            tar.add(root / "beat_schedule.py", "beat_schedule.py")
        script = f"rm -rf {GUEST_SRC}; mkdir -p {GUEST_SRC}; tar -xzf - -C {GUEST_SRC}"
        self.run(["sh", "-euc", script], input=archive.read_bytes(), text=False, timeout=120)
        self.run(["env", f"PYTHONPATH={GUEST_SRC}", GUEST_VENV_PYTHON, "-c", "import hoster_tasks.worker"], timeout=120)

    # -- helpers ---------------------------------------------------------------------------------------
    def ensure_pool_disk(self) -> None:
        """An ext4 on /dev/vdb mounted at GUEST_POOL_FILES (once per boot)."""
        if self._pools_ready:
            return
        self.sh(
            f"mountpoint -q {GUEST_POOL_FILES} || {{ mkfs.ext4 -q -F /dev/vdb; mkdir -p {GUEST_POOL_FILES};"
            f" mount -o noatime /dev/vdb {GUEST_POOL_FILES}; }}",
            timeout=120,
        )
        self._pools_ready = True

    def write_random(self, dataset: str, mib: int, filename: str | None = None) -> str:
        """`mib` MiB of random data into a new file in the mounted dataset; the file's guest path."""
        mountpoint = self.zfs("get", "-H", "-o", "value", "mountpoint", dataset).strip()
        path = f"{mountpoint}/{filename or f'data-{rand_hex(6)}.bin'}"
        self.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "status=none"], timeout=300)
        return path

    def sha256_files(self, dataset: str, mountpoint: str | None = None) -> dict[str, str]:
        """{relative path: sha256} of every regular file under the dataset's mountpoint (or `mountpoint`).
        A dataset that is not mounted (a copy received with -u) is mounted for this and unmounted again
        (an encrypted one needs its key loaded first)."""
        where = mountpoint
        mounted_here = False
        if where is None:
            where, mounted = self.zfs("get", "-H", "-o", "value", "mountpoint,mounted", dataset).split()
            if mounted != "yes":
                self.zfs("mount", dataset)
                mounted_here = True
        try:
            out = self.sh(f"cd {shlex.quote(where)} && find . -xdev -type f -print0 | sort -z | xargs -0r sha256sum")
        finally:
            if mounted_here:
                self.zfs("unmount", dataset)
        result = {}
        for line in str(out.stdout).splitlines():
            digest, name = line.split(None, 1)
            result[name.removeprefix("./")] = digest
        return result

    def pkill(self, pattern: str, signal_name: str = "KILL") -> int:
        """`pkill -SIG -f pattern` in the guest; how many processes matched (0 when none)."""
        res = self.run(["pkill", "-e", f"-{signal_name}", "-f", "--", pattern], check=False)
        if res.returncode not in (0, 1):
            raise HarnessError(f"pkill -f {pattern!r} failed (exit {res.returncode}): {res.stderr}")
        return len([line for line in str(res.stdout).splitlines() if "killed" in line])

    def pgrep(self, pattern: str) -> list[str]:
        """Command lines of the guest's processes matching `pattern` (pgrep -af)."""
        res = self.run(["pgrep", "-af", "--", pattern], check=False)
        return [line for line in str(res.stdout).splitlines() if line.strip()]


class _QemuExited(Exception):
    pass


# -- pools ------------------------------------------------------------------------------------------------
OWNER_PROPERTY = "org.hoster.test:owner"


@dataclass
class GuestPool:
    """A pool in the guest on a sparse file under GUEST_POOL_FILES, mounted at /mnt/<name>."""

    guest: Guest
    name: str
    vdev: str
    mountpoint: str

    def ds(self, relative: str) -> str:
        """Full dataset name for a path relative to the pool root ("vm/a" -> "<pool>/vm/a")."""
        return f"{self.name}/{relative}" if relative else self.name

    def create_dataset(self, relative: str, props: Mapping[str, str] | None = None, parents: bool = True) -> str:
        name = self.ds(relative)
        argv = ["create", *(["-p"] if parents else [])]
        for k, v in (props or {}).items():
            argv += ["-o", f"{k}={v}"]
        self.guest.zfs(*argv, name)
        return name


@dataclass
class GuestPoolFactory:
    """`factory(size="2G") -> GuestPool`: throw-away pools with unique names; `cleanup()` destroys them."""

    guest: Guest
    pools: list[GuestPool] = field(default_factory=list)

    def __call__(self, size: str = "2G", prefix: str = "oz", **props: str) -> GuestPool:
        self.guest.ensure_pool_disk()
        existing = set(self.guest.zpool("list", "-H", "-o", "name").split())
        name = f"{prefix}{rand_hex(6)}"
        while name in existing:
            name = f"{prefix}{rand_hex(6)}"
        vdev = f"{GUEST_POOL_FILES}/{name}.img"
        mountpoint = f"{GUEST_MOUNT_ROOT}/{name}"
        argv = ["zpool", "create", "-m", mountpoint, "-O", f"{OWNER_PROPERTY}=pytest-{os.getpid()}"]
        for k, v in props.items():
            argv += ["-O", f"{k}={v}"]
        self.guest.sh(f"truncate -s {shlex.quote(size)} {vdev}")
        pool = GuestPool(self.guest, name, vdev, mountpoint)
        self.pools.append(pool)  # registered before create: cleanup removes the file of a failed create
        self.guest.run([*argv, name, vdev], timeout=120)
        return pool

    def cleanup(self) -> None:
        errors = []
        for pool in reversed(self.pools):
            # `zpool destroy` retried while a filesystem is busy (a process may still be exiting)
            script = (
                f"if zpool list {pool.name} >/dev/null 2>&1; then"
                f" for i in 1 2 3 4 5 6 7 8 9 10; do zpool destroy -f {pool.name} && break; sleep 1; done; fi;"
                f" if ! zpool list {pool.name} >/dev/null 2>&1; then rm -f {pool.vdev};"
                f" rmdir {pool.mountpoint} 2>/dev/null || true; fi"
            )
            try:
                self.guest.sh(script, timeout=120)
                if pool.name in self.guest.zpool("list", "-H", "-o", "name").split():
                    errors.append(f"pool {pool.name} still exists after zpool destroy")
            except HarnessError as exc:
                errors.append(str(exc))
        self.pools.clear()
        if errors:
            raise HarnessError("guest pool cleanup failed:\n" + "\n".join(errors))


# -- endpoints and workers --------------------------------------------------------------------------------
def endpoint(name: str = "ozfs-target", root_map: Mapping[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """A HOSTER_TARGETS entry for the guest's own sshd (guest paths): the target of a guest worker."""
    entry: dict[str, Any] = {
        "name": name,
        "host": "127.0.0.1",
        "port": 22,
        "user": "root",
        "key_file": GUEST_KEY,
        "known_hosts": GUEST_KNOWN_HOSTS,
        "root_map": dict(root_map or {}),
    }
    entry.update(overrides)
    return entry


def _env_value(value: Any) -> str:
    """Strings as they are; lists, dicts, numbers and booleans as JSON (as tests/harness/workers.py)."""
    return value if isinstance(value, str) else json.dumps(value)


class GuestWorker:
    """A `python -m hoster_tasks worker` inside the guest; the interface of harness.workers.Worker.

    It runs in a session of its own under a small sh that records its pid and exit code; `stop()` sends
    SIGTERM to the session's process group (the Celery pool children too), SIGKILL after `timeout`.
    Paths (`log_path`, `error_dir`) are guest paths."""

    def __init__(self, guest: Guest, node_name: str, env: dict[str, str], workdir: str, host_redis_url: str) -> None:
        self.guest = guest
        self.node_name = node_name
        self.env = env
        self.dir = PurePosixPath(workdir)
        self.log_path = self.dir / "worker.log"
        self.error_dir = PurePosixPath(env["HOSTER_ERROR_DIR"])
        self.host_redis_url = host_redis_url
        self.pgid: int | None = None
        self._returncode: int | None = None
        self.start_seconds: float | None = None  # start() to ready

    @property
    def redis_url(self) -> str:
        """The Redis the worker uses, as the host reaches it."""
        return self.host_redis_url

    def start(self) -> GuestWorker:
        d = shlex.quote(str(self.dir))
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        inner = (
            f"cd {GUEST_SRC}; echo $$ > {d}/pgid;"
            f" env -i {envs} {GUEST_VENV_PYTHON} -m hoster_tasks worker </dev/null >>{d}/worker.log 2>&1 &"
            f" trap '' TERM INT HUP; wait $!; echo $? > {d}/rc"
        )
        script = (
            f"mkdir -p {d} {shlex.quote(str(self.error_dir))}; rm -f {d}/pgid {d}/rc;"
            f" setsid sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &"
            f" for i in $(seq 100); do [ -s {d}/pgid ] && break; sleep 0.1; done; cat {d}/pgid"
        )
        self._started = time.monotonic()
        out = self.guest.sh(script, timeout=60)
        self.pgid = int(str(out.stdout).strip())
        return self

    def _state(self) -> tuple[bool, int | None]:
        """(running, exit code or None), read from the guest."""
        if self.pgid is None:
            return False, None
        d = shlex.quote(str(self.dir))
        res = self.guest.sh(
            f"if [ -e {d}/rc ]; then echo exit $(cat {d}/rc);"
            f" elif /bin/kill -0 -- -{self.pgid} 2>/dev/null; then echo running; else echo gone; fi",
            timeout=30,
        )
        word, *rest = str(res.stdout).split()
        if word == "exit":
            self._returncode = int(rest[0]) if rest else None
            return False, self._returncode
        return word == "running", self._returncode

    @property
    def running(self) -> bool:
        return self._state()[0]

    @property
    def returncode(self) -> int | None:
        return self._state()[1] if self._returncode is None else self._returncode

    def wait_ready(self, timeout: float = 120) -> GuestWorker:
        """Wait until the worker registered its node key in Redis (it writes it once it consumes)."""
        from hoster_tasks import keys  # the application's own key scheme

        key = keys.node(self.node_name)
        with redis.Redis.from_url(self.host_redis_url, socket_timeout=2) as client:

            def ready() -> bool:
                try:
                    if client.exists(key):
                        return True
                except redis.RedisError:
                    return False
                running, code = self._state()
                if not running:
                    raise HarnessError(
                        f"guest worker {self.node_name} exited with {code} before it was ready:\n{self.log_tail()}"
                    )
                return False

            wait_until(
                ready, timeout, f"guest worker {self.node_name} to write {key}", interval=0.5,
                on_timeout=lambda: f"guest worker log tail ({self.log_path}):\n{self.log_tail()}",
            )  # fmt: skip
        self.start_seconds = time.monotonic() - self._started
        return self

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (Celery warm shutdown) to the process group, SIGKILL to it after `timeout`."""
        if self.pgid is None or not self.guest.running:
            return self._returncode
        d = shlex.quote(str(self.dir))
        g = self.pgid
        self.guest.sh(
            f"/bin/kill -TERM -- -{g} 2>/dev/null || true;"
            f" for i in $(seq {int(timeout * 10)}); do [ -e {d}/rc ] && break; sleep 0.1; done;"
            f" /bin/kill -KILL -- -{g} 2>/dev/null || true",
            timeout=timeout + 30,
        )
        running, code = self._state()
        return code if code is not None else (-signal.SIGKILL if not running else None)

    def kill(self) -> int | None:
        """Simulate a crash: SIGKILL the whole process group at once."""
        if self.pgid is None or not self.guest.running:
            return self._returncode
        self.guest.sh(f"/bin/kill -KILL -- -{self.pgid} 2>/dev/null || true", timeout=30)
        wait_until(lambda: not self._state()[0], 10, f"guest worker {self.node_name} to die")
        self._returncode = -signal.SIGKILL if self._returncode is None else self._returncode
        return self._returncode

    def log_tail(self, lines: int = 80) -> str:
        if not self.guest.running:
            return "(guest not running)"
        res = self.guest.run(["tail", "-n", str(lines), str(self.log_path)], check=False, timeout=30)
        return str(res.stdout or res.stderr)

    def error_files(self) -> list[str]:
        """Names of the ERROR_ files the worker wrote."""
        res = self.guest.run(["ls", "-1", str(self.error_dir)], check=False, timeout=30)
        return sorted(n for n in str(res.stdout).split() if n.startswith("ERROR_"))


class GuestWorkerFactory:
    """`factory(node_name, env) -> GuestWorker`, ready when returned; `cleanup()` stops them all."""

    def __init__(self, guest: Guest, host_redis_url: str) -> None:
        self.guest = guest
        self.host_redis_url = host_redis_url
        self.workers: list[GuestWorker] = []
        self.run_id = rand_hex(6)

    def __call__(
        self,
        node_name: str,
        env: Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        timeout: float = 180,
    ) -> GuestWorker:
        """Start a worker for `node_name` in the guest. `env` overrides the defaults HOSTER_REDIS_URL (the
        guestfwd address), HOSTER_NODE_NAME and HOSTER_ERROR_DIR; non-string values are JSON-encoded."""
        workdir = f"{GUEST_RUN}/{self.run_id}/worker-{node_name}-{len(self.workers)}"
        full = {
            "PATH": GUEST_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": GUEST_SRC,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOSTER_REDIS_URL": self.guest.redis_url,
            "HOSTER_NODE_NAME": node_name,
            "HOSTER_ERROR_DIR": f"{workdir}/errors",
        }
        full.update({k: _env_value(v) for k, v in (env or {}).items()})
        worker = GuestWorker(self.guest, node_name, full, workdir, self.host_redis_url)
        self.workers.append(worker)  # registered before start: cleanup covers a failed start
        worker.start()
        if wait:
            worker.wait_ready(timeout)
        return worker

    def log_tails(self, lines: int = 80) -> str:
        return "\n".join(
            f"----- guest worker {w.node_name} (exit {w.returncode}), {w.log_path} -----\n{w.log_tail(lines)}"
            for w in self.workers
        )

    def cleanup(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()


# -- building the image beside the other tests ------------------------------------------------------------
class ImageBuild:
    """`openzfs-guest.sh build` in the background at idle priority (nice 19, ionice idle), started when a
    session that has OpenZFS tests begins: its ~7-10 minutes (zfs-dkms compiles) overlap the zfs-fuse tier,
    which then still gets the CPU first. The guest fixture waits for it; a failed build fails loudly."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> ImageBuild:
        argv = ["bash", str(BUILD_SCRIPT), "build"]
        if shutil.which("ionice"):
            argv = ["ionice", "-c", "3", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", "19", *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()
        return self

    def wait(self, timeout: float = 3600) -> float:
        """Until the build ended; its seconds. Raises HarnessError with the log's tail when it failed."""
        if self.proc is None:
            return 0.0
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=10, group=True)
            raise HarnessError(f"the guest image build took over {timeout:.0f}s:\n{tail(self.log_path, 40)}") from None
        if code != 0:
            raise HarnessError(f"the guest image build failed (exit {code}), {self.log_path}:\n"
                               f"{tail(self.log_path, 60)}")
        return time.monotonic() - self.started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=10, group=True)


def image_missing() -> bool:
    """True where this machine could build the image but has none for the current recipe."""
    return os.geteuid() == 0 and shutil.which("debootstrap") is not None and \
        not (image_dir() / "root.img").exists()

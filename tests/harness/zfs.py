"""zfs-fuse daemon, throw-away pools on sparse files, and helpers to arrange ZFS scenarios.

All commands run in the ROOT namespace: zfs-fuse is one daemon for every namespace, and creating or
mounting a filesystem from inside a network namespace fails (FUSE mounts land in that namespace's own
mount namespace).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .proc import HarnessError, make_private_dir, pid_alive, rand_hex, run, tail, wait_until

# User property on every pool this harness creates: the pid of the pytest process that owns it, so a
# later run can destroy pools left behind by a killed run without touching a concurrent run's pools.
OWNER_PROPERTY = "htharness:owner"
_CHUNK = 1024 * 1024


def zfs_fuse_pids() -> list[int]:
    """Pids of running zfs-fuse daemons (read from /proc: no dependency on procps)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "zfs-fuse":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _zpool_answers() -> bool:
    try:
        return run(["zpool", "list", "-H"], check=False, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class ZfsFuse:
    """Makes sure a zfs-fuse daemon runs; stops it at the end only if this object started it.

    It also owns `mount_root`, the directory under which pools are mounted. This machine's root mount is
    private (no systemd), so every `ip netns exec` process would keep a private copy of each ZFS mount
    and `zpool destroy` would fail with "pool is busy" while a node lives. `mount_root` is bind-mounted
    onto itself and made shared: namespaces get slave copies, and unmounts (and new mounts) propagate.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.pidfile = state_dir / "zfs-fuse.pid"
        self.mount_root = state_dir / "mnt"
        self.started_by_us = False
        self.pid: int | None = None

    def ensure(self, timeout: float = 30) -> None:
        make_private_dir(self.state_dir)
        if not zfs_fuse_pids():
            self._start()
        wait_until(_zpool_answers, timeout, "zfs-fuse to answer `zpool list`", interval=0.2)
        self._share_mount_root()
        self.check_health()

    def check_health(self, timeout: float = 20) -> None:
        """Create, mount, use and destroy a tiny pool, so a wedged daemon fails the run at once.

        Seen here: a zfs-fuse daemon that still answers `zpool list` but never serves new FUSE mounts;
        every later process that touches such a mount hangs in uninterruptible sleep. The probe runs in
        child processes with timeouts, never in this process.
        """
        name = f"htchk{rand_hex(4)}"
        image = self.state_dir / f"{name}.img"
        run(["truncate", "-s", "128M", str(image)])
        try:
            run(["zpool", "create", "-m", str(self.mount_root / name), name, str(image)], timeout=timeout)
            set_property(name, OWNER_PROPERTY, str(os.getpid()))
            run(["zfs", "create", f"{name}/probe"], timeout=timeout)
            run(["stat", str(self.mount_root / name / "probe")], timeout=timeout)
            destroy_pool(name, timeout=timeout)
        except (HarnessError, subprocess.TimeoutExpired) as exc:
            who = "started by this run" if self.started_by_us else f"pids {zfs_fuse_pids()}, not started by us"
            raise HarnessError(
                f"zfs-fuse ({who}) answers but does not serve a new pool: {exc}\n"
                "It is probably wedged; stop it (the tests start a fresh one) and retry."
            ) from None
        finally:
            image.unlink(missing_ok=True)

    def _share_mount_root(self) -> None:
        self.mount_root.mkdir(exist_ok=True)
        run(["mount", "--bind", str(self.mount_root), str(self.mount_root)])
        run(["mount", "--make-shared", str(self.mount_root)])

    def close(self) -> None:
        """Release the mount root, then stop the daemon if we started it and nobody else uses it."""
        _release_state_dir(self.state_dir)
        self.stop_if_idle()

    def _start(self) -> None:
        # zfs-fuse daemonizes itself and its daemon keeps the inherited stdout: never give it a pipe.
        log = self.state_dir / "zfs-fuse.log"
        with open(log, "ab") as out:
            proc = subprocess.run(
                ["zfs-fuse", "--pidfile", str(self.pidfile)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=30, check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            # zfs-fuse logs only to syslog: say what usually went wrong.
            raise HarnessError(
                f"zfs-fuse exited {proc.returncode} {tail(log, 5)!r}: is another zfs-fuse holding "
                "/var/lock/zfs/zfs_lock, or is /dev/fuse unusable?"
            )
        self.pid = wait_until(self._read_pid, 10, "zfs-fuse pid file")
        self.started_by_us = True

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_if_idle(self) -> None:
        """Stop the daemon we started, unless pools remain: a concurrent test run may still use it."""
        if self.started_by_us and not (_zpool_answers() and pool_names()):
            self.stop()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (zfs-fuse unmounts and exports cleanly), SIGKILL if it does not exit in time."""
        if not self.started_by_us or self.pid is None:
            return
        pid = self.pid
        try:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(pid), timeout, "zfs-fuse to exit", interval=0.2)
        except ProcessLookupError:
            pass
        except HarnessError:
            os.kill(pid, signal.SIGKILL)
        self.started_by_us = False
        self.pid = None


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _release_state_dir(state_dir: Path) -> None:
    """Lazily unmount our bind mount and delete the directory, but never delete into a live ZFS mount."""
    mount_root = state_dir / "mnt"
    if _mounts_under(mount_root) == [str(mount_root)]:  # pools still mounted below: leave it all alone
        run(["umount", "-l", str(mount_root)], check=False)
    if not _mounts_under(state_dir):
        shutil.rmtree(state_dir, ignore_errors=True)


def sweep_stale_state_dirs(run_dir: Path) -> None:
    """State dirs (zfs-<pid>) of pytest processes that no longer run."""
    for entry in run_dir.glob("zfs-*"):
        pid = entry.name.split("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _release_state_dir(entry)


@dataclass(frozen=True)
class Snapshot:
    name: str  # full name, dataset@snap
    guid: int
    createtxg: int

    @property
    def dataset(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[1]


@dataclass
class Pool:
    name: str
    image: Path
    mountpoint: Path

    def ds(self, relative: str) -> str:
        """Full dataset name for a path relative to the pool root ("vm/a" -> "<pool>/vm/a")."""
        return f"{self.name}/{relative}" if relative else self.name

    def create_dataset(self, relative: str, props: Mapping[str, str] | None = None) -> str:
        return create_dataset(self.ds(relative), props)


@dataclass
class PoolFactory:
    """Creates pools on sparse files under `base`, mounted under `mount_root`; `cleanup()` destroys them
    and deletes the files."""

    base: Path
    mount_root: Path
    pools: list[Pool] = field(default_factory=list)

    def __call__(self, size: str = "4G", prefix: str = "ht") -> Pool:
        existing = set(pool_names())
        name = f"{prefix}{rand_hex(4)}{chr(ord('a') + len(self.pools) % 26)}"
        while name in existing:
            name = f"{prefix}{rand_hex(4)}{chr(ord('a') + len(self.pools) % 26)}"
        image = self.base / f"{name}.img"
        mountpoint = self.mount_root / name
        self.base.mkdir(parents=True, exist_ok=True)
        run(["truncate", "-s", size, str(image)])
        run(["zpool", "create", "-m", str(mountpoint), name, str(image)])
        pool = Pool(name=name, image=image, mountpoint=mountpoint)
        self.pools.append(pool)
        set_property(name, OWNER_PROPERTY, str(os.getpid()))
        return pool

    def cleanup(self) -> None:
        errors = []
        for pool in reversed(self.pools):
            try:
                destroy_pool(pool.name)
                pool.image.unlink(missing_ok=True)
                shutil.rmtree(pool.mountpoint, ignore_errors=True)
            except HarnessError as exc:
                errors.append(str(exc))
        self.pools.clear()
        if errors:
            raise HarnessError("pool cleanup failed:\n" + "\n".join(errors))


def pool_names() -> list[str]:
    return run(["zpool", "list", "-H", "-o", "name"]).stdout.split()


def destroy_pool(name: str, timeout: float = 20) -> None:
    """`zpool destroy -f`, retried while a filesystem is busy (a process may still be exiting)."""

    last_error = [""]

    def attempt() -> bool:
        proc = run(["zpool", "destroy", "-f", name], check=False)
        last_error[0] = proc.stderr.strip()
        return proc.returncode == 0 or name not in pool_names()

    wait_until(attempt, timeout, f"zpool destroy {name}", interval=0.5, on_timeout=lambda: last_error[0])


def sweep_stale_pools() -> list[str]:
    """Destroy pools that a pytest process, now dead, created with this harness (best effort)."""
    swept = []
    for name in pool_names():
        owner = get_property(name, OWNER_PROPERTY, check=False)
        if owner.isdigit() and not pid_alive(int(owner)):
            if run(["zpool", "destroy", "-f", name], check=False).returncode == 0:
                swept.append(name)
    return swept


def create_dataset(name: str, props: Mapping[str, str] | None = None, parents: bool = True) -> str:
    """`zfs create [-p] [-o k=v]... name`; props may be user properties ({"hoster:x": "1"})."""
    argv = ["zfs", "create"] + (["-p"] if parents else [])
    for key, value in (props or {}).items():
        argv += ["-o", f"{key}={value}"]
    run([*argv, name])
    return name


def destroy(name: str, recursive: bool = False) -> None:
    run(["zfs", "destroy", *(["-r"] if recursive else []), name])


def snapshot(dataset: str, short: str, recursive: bool = False) -> str:
    """Take `dataset@short` directly (behind the system's back). One name per call: zfs-fuse refuses more."""
    full = f"{dataset}@{short}"
    run(["zfs", "snapshot", *(["-r"] if recursive else []), full])
    return full


def get_property(name: str, prop: str, check: bool = True) -> str:
    """Exact (parsable) value of one property; '-' when unset."""
    proc = run(["zfs", "get", "-Hp", "-o", "value", prop, name], check=check)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def set_property(name: str, prop: str, value: str) -> None:
    run(["zfs", "set", f"{prop}={value}", name])


def datasets(root: str) -> list[str]:
    """Filesystems at and under `root` (no snapshots)."""
    return run(["zfs", "list", "-H", "-r", "-o", "name", root]).stdout.split()


def exists(name: str) -> bool:
    return run(["zfs", "get", "-H", "-o", "value", "guid", name], check=False).returncode == 0


def snapshots(dataset: str, recursive: bool = False) -> list[Snapshot]:
    """Snapshots of `dataset` (and of its descendants if `recursive`), oldest first.

    zfs-fuse has no `zfs get -t`: read guid and createtxg of the whole subtree and keep names with '@'.
    """
    out = run(["zfs", "get", "-Hp", "-r", "-o", "name,property,value", "guid,createtxg", dataset]).stdout
    props: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, prop, value = line.split("\t")
        if "@" in name and (recursive or name.split("@", 1)[0] == dataset):
            props.setdefault(name, {})[prop] = value
    snaps = [Snapshot(n, int(p["guid"]), int(p["createtxg"])) for n, p in props.items()]
    return sorted(snaps, key=lambda s: (s.createtxg, s.name))


def snapshot_guids(dataset: str, recursive: bool = False) -> dict[str, int]:
    """{full snapshot name: guid}."""
    return {s.name: s.guid for s in snapshots(dataset, recursive)}


def mountpoint(dataset: str) -> Path:
    return Path(get_property(dataset, "mountpoint"))


def mount(dataset: str) -> Path:
    """Mount (from the root namespace) a filesystem received with `zfs receive -u`."""
    if get_property(dataset, "mounted") != "yes":
        run(["zfs", "mount", dataset])
    return mountpoint(dataset)


def write_random(dataset: str, mib: int, filename: str | None = None) -> Path:
    """Write `mib` MiB of random data into a new file in the dataset's mountpoint, then sync."""
    path = mount(dataset) / (filename or f"data-{rand_hex(8)}.bin")
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(_CHUNK))
        fh.flush()
        os.fsync(fh.fileno())
    os.sync()  # the kernel may still hold FUSE writes: hand them to zfs-fuse before any snapshot
    return path

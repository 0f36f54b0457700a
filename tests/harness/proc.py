"""Small process helpers shared by the harness modules (argument lists only, never a shell)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Root-only tools live in sbin; a CI environment may not have those on PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class HarnessError(RuntimeError):
    """The test environment could not be set up or torn down."""


def ensure_sbin_on_path() -> None:
    """Put the sbin directories on PATH so `zfs`, `ip` and `sshd` resolve here and in child processes."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in SBIN_DIRS if d not in parts]
    if missing:
        os.environ["PATH"] = os.pathsep.join([p for p in parts if p] + missing)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 60,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text; on failure raise with the command and its stderr."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise HarnessError(
            f"command failed (exit {proc.returncode}): {args}\n"
            f"stdout: {(proc.stdout or '').strip()[-2000:]}\nstderr: {(proc.stderr or '').strip()[-2000:]}"
        )
    return proc


def rand_hex(n: int = 4) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the caller retries if it is taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None | bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy; raise HarnessError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a log file (empty if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10, group: bool = False) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL (the whole process group if `group`)."""

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children of a group leader (Celery pool processes) may outlive it: always sweep the group.
    send(signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


def make_private_dir(path: Path) -> Path:
    """A directory only root can enter (sshd's StrictModes and our keys need it)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path

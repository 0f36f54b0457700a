"""Where commands run: `LocalShell` (subprocess, no shell) and `SshShell` (Fabric, for control commands).

Quoting happens exactly once, in `remote_command_line`, at the SSH boundary. The data path (`zfs send |
ssh zfs receive`) uses the OpenSSH client instead; `ssh_argv` builds that argv with the same quoting.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from hoster_tasks.errors import CommandFailed, ConnectionLost, zfs_error

if TYPE_CHECKING:  # annotations only: the CLI's light path imports this module without pydantic
    from hoster_tasks.settings import Endpoint

DEFAULT_TIMEOUT = 120.0
T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str


class Shell(Protocol):
    host: str

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result: ...

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        """The local argv that runs `argv` on this shell's host (for pipelines)."""
        ...

    def close(self) -> None: ...


def _checked(result: Result, host: str, check: bool) -> Result:
    if check and result.exit_code != 0:
        raise zfs_error(result.argv, result.exit_code, result.stderr, host)
    return result


class LocalShell:
    host = "local"

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError as exc:
            raise CommandFailed(argv, 127, str(exc)) from None
        except subprocess.TimeoutExpired:
            raise CommandFailed(argv, -1, f"timed out after {timeout:.0f}s") from None
        return _checked(Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr), self.host, check)

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def close(self) -> None:
        pass


def remote_command_line(argv: Sequence[str]) -> str:
    """The one place an argv becomes a string: for the remote login shell (sh or csh both accept it)."""
    return shlex.join(argv)


def ssh_options(endpoint: Endpoint) -> list[str]:
    opts = [
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",  # never accept an unknown or changed host key
        "-o", f"ConnectTimeout={endpoint.connect_timeout}",
        "-o", f"ServerAliveInterval={endpoint.keepalive_seconds}",
        "-o", "ServerAliveCountMax=3",
        "-p", str(endpoint.port),
        "-l", endpoint.user,
    ]
    if endpoint.known_hosts is not None:
        opts += ["-o", f"UserKnownHostsFile={endpoint.known_hosts}"]
    if endpoint.key_file is not None:
        opts += ["-i", str(endpoint.key_file), "-o", "IdentitiesOnly=yes"]
    return opts


def ssh_argv(endpoint: Endpoint, argv: Sequence[str]) -> list[str]:
    return ["ssh", *ssh_options(endpoint), "--", endpoint.host, remote_command_line(argv)]


class SshShell:
    """Control commands over one reused Fabric connection, host keys checked strictly."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.host = endpoint.name
        self._timeout = endpoint.connect_timeout
        self._conn: object | None = None
        self._used = False  # the connection has carried a command: it may since have died while idle

    def _connection(self):  # type: ignore[no-untyped-def]
        if self._conn is not None and self._used and not self._conn.is_connected:  # type: ignore[attr-defined]
            self._drop()  # closed by the peer (or a network cut) while idle: open a new one, run nothing twice
        if self._conn is None:
            import paramiko
            from fabric import Config, Connection

            kwargs: dict[str, object] = {"look_for_keys": self.endpoint.key_file is None, "allow_agent": False}
            if self.endpoint.key_file is not None:
                kwargs["key_filename"] = str(self.endpoint.key_file)
            conn = Connection(
                self.endpoint.host,
                user=self.endpoint.user,
                port=self.endpoint.port,
                connect_timeout=self._timeout,
                connect_kwargs=kwargs,
                config=Config(overrides={"load_ssh_configs": False}),
            )
            # Fabric defaults to AutoAddPolicy; a replication target must be known in advance.
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            if self.endpoint.known_hosts is not None:
                conn.client.load_host_keys(str(self.endpoint.known_hosts))
            else:
                conn.client.load_system_host_keys()
            self._conn = conn
        return self._conn

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        conn = self._named_errors(argv, timeout, self._connection)
        self._used = True
        return self._run_on(conn, argv, check, timeout)

    def run_many(self, argvs: Sequence[Sequence[str]], check: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
        """Independent commands at the same time, a channel each on the one connection: one round trip
        instead of one per command. Every command runs to its end; then the first failure is raised."""
        if len(argvs) < 2:
            return [self.run(argv, check, timeout) for argv in argvs]
        first = list(argvs[0])
        conn = self._named_errors(first, timeout, lambda: _opened(self._connection()))
        self._used = True
        with ThreadPoolExecutor(len(argvs) - 1, thread_name_prefix="ssh-channel") as pool:
            rest = [pool.submit(self._run_on, conn, list(argv), check, timeout) for argv in argvs[1:]]
            results = [self._run_on(conn, first, check, timeout)]
            return results + [f.result() for f in rest]

    def _run_on(self, conn: Any, argv: list[str], check: bool, timeout: float) -> Result:
        res = self._named_errors(argv, timeout, lambda: conn.run(
            remote_command_line(argv), hide=True, warn=True, in_stream=False, timeout=timeout))
        return _checked(Result(tuple(argv), res.exited, res.stdout, res.stderr), self.host, check)

    def _named_errors(self, argv: list[str], timeout: float, fn: Callable[[], T]) -> T:
        """`fn()`, with paramiko's and invoke's errors named (a lost connection is dropped, to reopen)."""
        import paramiko

        try:
            return fn()
        except paramiko.BadHostKeyException as exc:
            raise CommandFailed(argv, 255, f"host key mismatch: {exc}", self.host) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc) or "known_hosts" in str(exc):
                raise CommandFailed(argv, 255, f"host key not trusted: {exc}", self.host) from None
            self._drop()
            raise ConnectionLost(argv, 255, f"ssh: {exc}", self.host) from None
        except (TimeoutError, OSError, EOFError) as exc:
            self._drop()
            raise ConnectionLost(argv, 255, f"ssh: {type(exc).__name__}: {exc}", self.host) from None
        except Exception as exc:  # invoke's CommandTimedOut and friends
            if type(exc).__name__ == "CommandTimedOut":
                self._drop()
                raise ConnectionLost(argv, -1, f"timed out after {timeout:.0f}s", self.host) from None
            raise

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return ssh_argv(self.endpoint, argv)

    def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        """Close the connection (the next command opens a new one)."""
        if self._conn is not None:
            try:
                self._conn.close()  # type: ignore[attr-defined]
            finally:
                self._conn = None
                self._used = False


class KeptSshShell(SshShell):
    """An SshShell a worker process keeps open across tasks (`kept_ssh`): `close()` leaves it open; a lost
    connection is still dropped and the next command reconnects. Commands are serialised (one channel at a
    time), in case a pool runs tasks in threads."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._lock = threading.Lock()

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        with self._lock:
            return super().run(argv, check, timeout)

    def run_many(self, argvs: Sequence[Sequence[str]], check: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
        with self._lock:
            return super().run_many(argvs, check, timeout)

    def close(self) -> None:
        pass  # kept for the next task of this process


_KEPT: dict[tuple[int, str], KeptSshShell] = {}


def kept_ssh(endpoint: Endpoint) -> KeptSshShell:
    """One SSH control connection per endpoint and worker process, reused by every task it runs.

    Keyed by the process id too: a Celery prefork child starts with a copy of its parent's memory, and a
    paramiko connection must never be shared across a fork (both would write to one socket). A child
    therefore opens its own on first use and never touches (or closes) one it inherited."""
    key = (os.getpid(), endpoint.model_dump_json())
    shell = _KEPT.get(key)
    if shell is None:
        shell = _KEPT[key] = KeptSshShell(endpoint)
    return shell


def _opened(conn: Any) -> Any:
    conn.open()  # connected here, once: the channels then share it (Fabric's run opens only when needed)
    return conn


def run_many(shell: Shell, argvs: Sequence[Sequence[str]], check: bool = True) -> list[Result]:
    """Commands that do not depend on each other: at the same time over SSH (`SshShell.run_many`), one
    after another elsewhere (a local command costs no round trip)."""
    if isinstance(shell, SshShell):
        return shell.run_many(argvs, check)
    return [shell.run(argv, check) for argv in argvs]


def shell_for(endpoint: Endpoint | None) -> Shell:
    """Local when there is no endpoint (this node), SSH otherwise."""
    return LocalShell() if endpoint is None else SshShell(endpoint)

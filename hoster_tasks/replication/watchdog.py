"""A transfer's watchdog: a small process that kills the pipeline's stages once their locks are no longer held.

A worker that is stalled rather than dead (SIGSTOP, a frozen host, a debugger) stops renewing its locks but
its stages go on streaming. The watchdog runs in its own session, so a stop of the worker's process group
does not stop it; every renewal interval it reads the lock keys, and it SIGKILLs the stages' process groups
as soon as a key no longer holds our value, or Redis has stayed unreachable until the last lease it saw ran
out. So a transfer outlives its lease by at most one renewal interval. It dies with its parent (parent-death
signal) and exits when its stdin closes.

Protocol on stdin, one JSON line each: the settings (with the Redis URL, which may hold a password: never on
argv), then the stages' process groups. On stdout, written *before* it kills anything: one JSON line naming
the lock it lost. The parent reads it after killing the watchdog (`Watchdog.stop`), so a verdict is never
missed and the parent never waits for the watchdog's start-up.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from hoster_tasks.errors import HosterTasksError, LockLost, PipelinePermanent
from hoster_tasks.redis_conn import client_from_url
from hoster_tasks.replication.pdeathsig import die_with_parent

if TYPE_CHECKING:
    from hoster_tasks.locks import DatasetLock

SLACK = 0.05  # poll this long after the shortest lease should run out: a renewal just before it is seen
EXIT_KILLED = 3  # the watchdog killed the stages (its verdict is on stdout)


@dataclass(frozen=True)
class LeaseWatch:
    """What a transfer's watchdog checks: each lock key must still hold its value."""

    redis_url: str = field(repr=False)  # may hold a password: kept out of reprs and logs
    locks: tuple[tuple[str, str], ...]  # (key, the value it holds while the lock is ours)
    lease_seconds: float
    interval: float  # the locks' renewal interval: how often the watchdog looks

    @classmethod
    def of(cls, redis_url: str, locks: Sequence[DatasetLock]) -> LeaseWatch | None:
        """For the locks in hand; None without locks (nothing to watch)."""
        if not locks:
            return None
        lease = min(lock.spec.lease for lock in locks)
        # the lock heartbeat's renewal interval (locks.py): the lease may run out one interval after a look
        return cls(redis_url, tuple((lock.key, lock.value) for lock in locks), lease, max(lease / 3, 0.2))


@dataclass(frozen=True)
class Lost:
    """Why the stages must die: `key` was found gone ("expired"), held by another ("taken"), or Redis was
    unreachable until its lease ran out ("unreachable")."""

    key: str
    why: str


# -- the decision, pure -------------------------------------------------------------------------------------
def lease_left(replies: Sequence[tuple[bytes | None, int]], watch: LeaseWatch) -> float | Lost:
    """From (GET, PTTL) per lock key: the seconds the shortest lease has left, or the first lock not ours."""
    left = watch.lease_seconds
    for (key, value), (held, pttl_ms) in zip(watch.locks, replies, strict=True):
        if held is None:
            return Lost(key, "expired")
        if held != value.encode():
            return Lost(key, "taken")
        if pttl_ms >= 0:  # -1: no expiry (someone persisted it); count a full lease
            left = min(left, pttl_ms / 1000)
    return left


def next_wait(interval: float, until_deadline: float) -> float:
    """Look again after one interval, or just after the shortest lease runs out if that comes first."""
    return min(interval, max(until_deadline, 0.0) + SLACK)


def watch(
    spec: LeaseWatch,
    poll: Callable[[], float | Lost],
    done_within: Callable[[float], bool],
    clock: Callable[[], float] = time.monotonic,
) -> Lost | None:
    """Poll until the stages are done (None) or a lock is lost (why to kill them).

    `poll` reads the leases (raises RedisError when Redis does not answer); `done_within(t)` waits up to t
    seconds and tells whether the stages are done.
    """
    deadline = clock() + spec.lease_seconds  # the lease cannot run longer than this from now
    while True:
        now = clock()
        try:
            seen = poll()
        except redis.RedisError:
            if now >= deadline:  # every lease we last saw has run out: nobody can hold it for us
                return Lost(",".join(key for key, _ in spec.locks), "unreachable")
        else:
            if isinstance(seen, Lost):
                return seen
            deadline = now + seen  # `now` was taken before the read: errs early
        if done_within(next_wait(spec.interval, deadline - clock())):
            return None


# -- the watchdog process -----------------------------------------------------------------------------------
def _read_line(fd: int) -> bytes:
    """One line from a raw fd (b"" at EOF), without a buffer that would hide a later EOF from select()."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            return b""
        line += chunk
    return line


def _stdin_closed(timeout: float) -> bool:
    ready, _, _ = select.select([0], [], [], timeout)
    return bool(ready) and os.read(0, 4096) == b""


def _kill_groups(pgids: Sequence[int]) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def main() -> int:
    config = _read_line(0)
    groups = _read_line(0) if config else b""
    if not groups:
        return 0  # the parent went away or finished before any stage ran
    raw = json.loads(config)
    spec = LeaseWatch(raw["redis_url"], tuple((k, v) for k, v in raw["locks"]), raw["lease"], raw["interval"])
    pgids = [int(p) for p in json.loads(groups)]
    timeout = max(min(spec.interval, 2.0), 0.2)  # a hung Redis must not hold the watchdog past a deadline
    client = client_from_url(spec.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def poll() -> float | Lost:
        pipe = client.pipeline(transaction=True)
        for key, _ in spec.locks:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        return lease_left(list(zip(replies[::2], replies[1::2], strict=True)), spec)

    lost = watch(spec, poll, _stdin_closed)
    if lost is None:
        return 0
    os.write(1, (json.dumps({"key": lost.key, "why": lost.why}) + "\n").encode())  # before the kill: see stop()
    _kill_groups(pgids)
    return EXIT_KILLED


# -- the parent's end ---------------------------------------------------------------------------------------
_MESSAGES = {
    "expired": "its lease expired while the worker was not renewing it",
    "taken": "another holder took it while the worker was not renewing it",
    "unreachable": "Redis stayed unreachable until its lease ran out",
}


class Watchdog:
    """Started before the stages (its start-up overlaps theirs); `guard` hands it their process groups."""

    def __init__(self, spec: LeaseWatch) -> None:
        self.argv = [sys.executable, "-m", __name__]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # a SIGSTOP or SIGKILL of the worker's process group does not reach it
            preexec_fn=die_with_parent(),
        )  # fmt: skip
        self._err: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self._send({"redis_url": spec.redis_url, "locks": spec.locks, "lease": spec.lease_seconds,
                    "interval": spec.interval})

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self._err.append(self.proc.stderr.read())

    def _send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: exited() tells, stop() reports it

    def guard(self, pgids: Sequence[int]) -> None:
        self._send(list(pgids))

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> HosterTasksError | None:
        """End the watchdog (call before reaping the stages: their pids must stay theirs until then).

        Returns the error to raise: LockLost if it killed the stages, PipelinePermanent if it failed."""
        code = self.proc.poll()
        if code is None:
            self.proc.kill()  # the verdict, if any, is already on stdout: it is written before the kill
            self.proc.wait()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        verdict = self.proc.stdout.read().decode(errors="replace").strip()
        self._reader.join(timeout=5)
        if verdict:
            lost = json.loads(verdict.splitlines()[0])
            why = _MESSAGES.get(lost["why"], lost["why"])
            return LockLost(f"the dataset lock was lost during the transfer: {why}; the watchdog stopped "
                            f"the transfer ({lost['key']})")
        if code not in (None, 0):
            stderr = b"".join(self._err).decode(errors="replace").strip()[-2000:]
            return PipelinePermanent(self.argv, code, f"the transfer's watchdog failed: {stderr}", "local")
        return None


if __name__ == "__main__":
    sys.exit(main())

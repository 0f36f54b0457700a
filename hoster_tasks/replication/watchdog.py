"""A transfer's watchdog: a small process that kills the pipeline's stages once their locks are no longer held.

A worker that is stalled rather than dead (SIGSTOP, a frozen host, a debugger) stops renewing its locks but
its stages go on streaming. The watchdog runs in its own session, so a stop of the worker's process group
does not stop it; every renewal interval it reads the lock keys, and it SIGKILLs the stages' process groups
as soon as a key no longer holds our value, or Redis has stayed unreachable until the last lease it saw ran
out. So a transfer outlives its lease by at most one renewal interval. It dies with its parent (parent-death
signal) and exits when its stdin closes.

The process is kept: a worker process starts one on its first transfer and hands it one transfer after
another (a new Python process per transfer cost ~0.3 s of CPU importing redis; bench/README.md, bar 1). It
watches one transfer at a time; a second concurrent transfer in the same process gets a second watchdog.

Protocol, one JSON line each. On stdin: a watch (the locks, the settings with the Redis URL, which may hold a
password: never on argv, and the stages' process groups), later `end` for it. On stdout: `lost` naming the
lock, written *before* it kills anything; and `ended` in answer to `end`, written once it has stopped
watching, so after `ended` it kills nothing of that transfer: the parent reaps the stages only then (their
pids stay theirs until reaped). A watchdog that does not answer `end` in time is killed, which ends it too.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
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


def _end_within(timeout: float) -> bool:
    """True once stdin has something: the parent's `end` (read by the caller) or EOF."""
    ready, _, _ = select.select([0], [], [], timeout)
    return bool(ready)


def _kill_groups(pgids: Sequence[int]) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def _say(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def _serve_one(request: dict[str, Any], clients: dict[str, redis.Redis]) -> bool:
    """Watch one transfer until the parent's `end`; False when stdin closed instead (the parent is gone)."""
    spec = LeaseWatch(request["redis_url"], tuple((k, v) for k, v in request["locks"]), request["lease"],
                      request["interval"])  # fmt: skip
    pgids = [int(p) for p in request["pgids"]]
    if spec.redis_url not in clients:
        timeout = max(min(spec.interval, 2.0), 0.2)  # a hung Redis must not hold the watchdog past a deadline
        clients[spec.redis_url] = client_from_url(spec.redis_url, socket_timeout=timeout,
                                                  socket_connect_timeout=timeout)  # fmt: skip
    client = clients[spec.redis_url]

    def poll() -> float | Lost:
        pipe = client.pipeline(transaction=True)
        for key, _ in spec.locks:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        return lease_left(list(zip(replies[::2], replies[1::2], strict=True)), spec)

    lost = watch(spec, poll, _end_within)
    if lost is not None:
        _say({"id": request["id"], "lost": {"key": lost.key, "why": lost.why}})  # before the kill: see stop()
        _kill_groups(pgids)
    if not _read_line(0):  # the parent's `end` (waited for, after a kill)
        return False
    _say({"id": request["id"], "ended": True})
    return True


def main() -> int:
    clients: dict[str, redis.Redis] = {}
    while line := _read_line(0):
        if not _serve_one(json.loads(line), clients):
            break
    return 0


# -- the parent's end ---------------------------------------------------------------------------------------
_MESSAGES = {
    "expired": "its lease expired while the worker was not renewing it",
    "taken": "another holder took it while the worker was not renewing it",
    "unreachable": "Redis stayed unreachable until its lease ran out",
}
END_TIMEOUT = 10.0  # seconds a watchdog may take to answer `end`; then it is killed
_idle: list[_Process] = []  # kept watchdogs of this process, free for the next transfer
_idle_lock = threading.Lock()


class _Process:
    """One kept watchdog process of this worker process, and the lines it wrote."""

    def __init__(self) -> None:
        self.owner = os.getpid()  # a forked child (Celery prefork) must start its own: pipes are per process
        self.argv = [sys.executable, "-m", __name__]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # a SIGSTOP or SIGKILL of the worker's process group does not reach it
            preexec_fn=die_with_parent(),
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()  # None: its stdout closed
        self._err: list[bytes] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]  # fmt: skip
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._err.append(raw)

    def send(self, obj: Any) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False  # it died: the caller finds out from exited() / stop()

    def alive(self) -> bool:
        return self.proc.poll() is None and self.owner == os.getpid()

    def kill(self) -> int:
        """Ends it, however it is (stopped, hung): after this it kills nothing."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)  # its last words (stderr) are read before they are reported
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except (BrokenPipeError, OSError):
                    pass
        return code

    def stderr_tail(self) -> str:
        return b"".join(self._err).decode(errors="replace").strip()[-2000:]


def _take() -> _Process:
    with _idle_lock:
        while _idle:
            kept = _idle.pop()
            if kept.alive():
                return kept
    return _Process()


def _give_back(kept: _Process) -> None:
    with _idle_lock:
        _idle.append(kept)


class Watchdog:
    """One transfer's watch, on a kept watchdog process: taken before the stages start (a new one's start-up
    overlaps theirs), `guard` hands it their process groups, `stop` ends the watch."""

    def __init__(self, spec: LeaseWatch) -> None:
        self.spec = spec
        self.id = uuid.uuid4().hex
        self._kept = _take()
        self.proc = self._kept.proc
        self._guarded = False
        self._lost: dict[str, str] | None = None
        self._ended = False

    def guard(self, pgids: Sequence[int]) -> None:
        self._guarded = self._kept.send({
            "id": self.id, "redis_url": self.spec.redis_url, "locks": self.spec.locks,
            "lease": self.spec.lease_seconds, "interval": self.spec.interval, "pgids": list(pgids),
        })  # fmt: skip

    def _read(self, timeout: float | None) -> bool:
        """Take the watchdog's next line for this watch; False when none came in time or it closed."""
        try:
            line = self._kept.lines.get(timeout=timeout) if timeout != 0 else self._kept.lines.get_nowait()
        except queue.Empty:
            return False
        if line is None:
            self._kept.lines.put(None)  # stays closed for every later look
            return False
        if line.get("id") == self.id:
            self._lost = line.get("lost", self._lost)
            self._ended = self._ended or bool(line.get("ended"))
        return True

    def exited(self) -> bool:
        """True once it killed the stages, or died (no transfer runs unguarded)."""
        while self._read(0):
            pass
        return self._lost is not None or self._kept.proc.poll() is not None

    def stop(self) -> HosterTasksError | None:
        """End the watch (call before reaping the stages: their pids must stay theirs until then).

        Returns the error to raise: LockLost if it killed the stages, PipelinePermanent if it failed."""
        healthy = True
        if self._guarded and self._kept.send({"id": self.id, "op": "end"}):
            deadline = time.monotonic() + END_TIMEOUT
            while not self._ended and (left := deadline - time.monotonic()) > 0:
                if not self._read(left) and self._kept.proc.poll() is not None:
                    break
            healthy = self._ended
        elif self._guarded:
            healthy = False
        code = None if healthy and self._kept.alive() else self._kept.kill()
        if code is None:
            _give_back(self._kept)
        if self._lost is not None:
            why = _MESSAGES.get(self._lost["why"], self._lost["why"])
            return LockLost(f"the dataset lock was lost during the transfer: {why}; the watchdog stopped "
                            f"the transfer ({self._lost['key']})")
        if code not in (None, 0) or (self._guarded and not healthy):
            return PipelinePermanent(self._kept.argv, code if code is not None else -1,
                                     f"the transfer's watchdog failed: {self._kept.stderr_tail()}", "local")
        return None


if __name__ == "__main__":
    sys.exit(main())

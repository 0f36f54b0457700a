"""The data path: `zfs send | pv | ssh target zfs receive`, as processes joined by pipes.

No shell and no Python copy of the bytes: the kernel moves them between the stages. `pv` limits the rate
(`-L`) and reports bytes on stderr (`-n -b`), which becomes progress. Every stage's exit status and stderr
is checked; the stage that failed first in causal order names the error.

Stages run in their own sessions (a kill of a stage never reaches the worker) and die with the worker
thread that started them (parent-death signal, see pdeathsig): no transfer outlives a dead worker. Given a
`LeaseWatch`, a watchdog process kills them once their locks are gone, even while the worker is frozen.
Given `stall_seconds`, a transfer whose byte count (pv's) has not grown for that long is stopped and raises
TransferStalled: a stalled link is retried (and resumed), a slow one is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hoster_tasks.errors import CommandFailed, LockLost, PipelinePermanent, TransferStalled, zfs_error
from hoster_tasks.replication.pdeathsig import die_with_parent
from hoster_tasks.replication.watchdog import LeaseWatch, Watchdog

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Stage:
    argv: list[str]
    host: str  # whose error text this is: "local" or the target's name


@dataclass
class StageResult:
    stage: Stage
    exit_code: int = 0
    stderr: str = ""


@dataclass
class PipelineResult:
    bytes: int
    seconds: float
    stages: list[StageResult] = field(default_factory=list)


def pv_argv(speed_limit_mb: float | None, interval: float = 0.5) -> list[str]:
    argv = ["pv", "-n", "-b", "-i", str(interval)]
    if speed_limit_mb is not None:
        argv += ["-L", str(int(speed_limit_mb * 1_000_000))]
    return argv


class StallClock:
    """The bytes sent so far, and when that count last grew. Updated from pv's reader thread, read by the
    waiting one. Once every byte has passed pv, the wait for the receive to commit is no stall: `done()`
    stops the clock."""

    def __init__(self, limit: float | None, now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._now = now
        self.bytes = 0
        self.last_growth = now()
        self.fired = False  # it stopped the transfer

    def saw(self, n: int) -> None:
        if n > self.bytes:
            self.bytes = n
            self.last_growth = self._now()

    def done(self) -> None:
        self.limit = None

    def stalled(self) -> bool:
        if self.limit is not None and self._now() - self.last_growth > self.limit:
            self.fired = True
        return self.fired


def _drain(stream: object, sink: list[str]) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        sink.append(raw.decode(errors="replace"))


def _read_pv(stream: object, on_bytes: Callable[[int], None], sink: list[str]) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        line = raw.decode(errors="replace").strip()
        if line.isdigit():
            on_bytes(int(line))
        else:
            sink.append(line + "\n")


def run_pipeline(
    send: Stage,
    receive: Stage,
    speed_limit_mb: float | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    timeout: float | None = None,
    lease: LeaseWatch | None = None,
    stall_seconds: float | None = None,
) -> PipelineResult:
    """Run `send | pv | receive`. With `lease`, a watchdog kills the stages once a lock is no longer ours;
    with `stall_seconds`, they are killed when no byte has moved for that long.

    Start it from a thread that lives until it returns (the stages die when that thread exits, on Linux)."""
    stages = [send, Stage(pv_argv(speed_limit_mb), "local"), receive]
    results = [StageResult(s) for s in stages]
    clock = StallClock(stall_seconds)  # its byte count is the transfer's (pv's count only grows)

    def on_bytes(n: int) -> None:
        clock.saw(n)
        if progress is not None:
            progress(n)

    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    stderr_bufs: list[list[str]] = [[] for _ in stages]
    stdin = subprocess.DEVNULL
    watchdog = Watchdog(lease) if lease is not None else None  # first: its start-up overlaps the stages'
    try:
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            proc = subprocess.Popen(
                stage.argv,
                stdin=stdin,
                stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # so a kill reaches the stage and not the worker
                preexec_fn=die_with_parent(),  # ...and the stage still dies with the worker
            )
            if i > 0 and procs[-1].stdout is not None:
                procs[-1].stdout.close()  # only the next stage holds the read end: SIGPIPE works
            procs.append(proc)
            stdin = proc.stdout  # type: ignore[assignment]
            reader = (
                threading.Thread(target=_read_pv, args=(proc.stderr, on_bytes, stderr_bufs[i]), daemon=True)
                if i == 1
                else threading.Thread(target=_drain, args=(proc.stderr, stderr_bufs[i]), daemon=True)
            )
            reader.start()
            readers.append(reader)
        if watchdog is not None:
            watchdog.guard([p.pid for p in procs])  # each stage leads its own process group
        _wait_all(procs, cancel, timeout, started, watchdog, clock)
    finally:
        for proc in procs:
            if _exit_status(proc) is None:
                _kill_group(proc.pid)
        # the watchdog goes before any stage is reaped: until then no stage's pid can be reused
        verdict = watchdog.stop() if watchdog is not None else None
        for proc in procs:
            proc.wait()
        for reader in readers:
            reader.join(timeout=5)
    for res, proc, buf in zip(results, procs, stderr_bufs, strict=False):
        res.exit_code = proc.returncode
        res.stderr = "".join(buf).strip()
    if isinstance(verdict, LockLost):
        raise verdict
    if cancel is not None and cancel.is_set():
        raise LockLost("the dataset lock was lost during the transfer: the transfer was stopped")
    if verdict is not None:
        raise verdict
    if clock.fired and any(r.exit_code != 0 for r in results):
        raise TransferStalled(
            f"no progress for {stall_seconds:g} s after {clock.bytes} bytes: the transfer was stopped "
            f"[stages: {_summary(results)}]"
        )
    _raise_for(results)
    return PipelineResult(clock.bytes, time.monotonic() - started, results)


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """A stage's exit code (negative: killed by that signal), or None while it runs; without reaping it."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()  # reaped elsewhere
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(
    procs: Sequence[subprocess.Popen[bytes]],
    cancel: threading.Event | None,
    timeout: float | None,
    t0: float,
    watchdog: Watchdog | None = None,
    clock: StallClock | None = None,
) -> None:
    while True:
        codes = [_exit_status(p) for p in procs]
        if all(c is not None for c in codes):
            return
        if cancel is not None and cancel.is_set():
            return
        if timeout is not None and time.monotonic() - t0 > timeout:
            return
        if watchdog is not None and watchdog.exited():  # it killed the stages, or failed: no transfer unguarded
            return
        if clock is not None:
            if codes[1] == 0:  # pv is done: every byte went to the receive, which may take a while to commit
                clock.done()
            elif clock.stalled():
                return
        # a dead stage means the rest can only fail: stop them instead of waiting on a stalled pipe
        if any(c not in (None, 0) for c in codes):
            time.sleep(0.5)
            return
        time.sleep(0.05)


def _summary(results: Sequence[StageResult]) -> str:
    return "; ".join(f"{r.stage.argv[0]}={r.exit_code}" for r in results)


def _raise_for(results: Sequence[StageResult]) -> None:
    """Name the root cause: a send that failed by itself, else the receive side (ssh/zfs), else pv."""
    send, pv, receive = results
    if all(r.exit_code == 0 for r in results):
        return
    summary = _summary(results)
    if send.exit_code > 0 and "broken pipe" not in send.stderr.lower():  # < 0: killed (SIGPIPE)
        raise _with_stages(zfs_error(send.stage.argv, send.exit_code, send.stderr, send.stage.host), summary)
    if receive.exit_code != 0:
        raise _with_stages(
            zfs_error(receive.stage.argv, receive.exit_code, receive.stderr, receive.stage.host), summary
        )
    if pv.exit_code != 0:
        raise PipelinePermanent(pv.stage.argv, pv.exit_code, pv.stderr + f" [{summary}]", "local")
    raise _with_stages(zfs_error(send.stage.argv, send.exit_code, send.stderr, send.stage.host), summary)


def _with_stages(exc: CommandFailed, summary: str) -> CommandFailed:
    exc.stderr = f"{exc.stderr} [stages: {summary}]"
    exc.args = (exc.argv, exc.exit_code, exc.stderr, exc.host)
    return exc

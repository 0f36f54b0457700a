"""The data path: `zfs send | pv | ssh target zfs receive`, as processes joined by pipes.

No shell and no Python copy of the bytes: the kernel moves them between the stages. `pv` limits the rate
(`-L`) and reports bytes on stderr (`-n -b`), which becomes progress. Every stage's exit status and stderr
is checked; the stage that failed first in causal order names the error.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hoster_tasks.errors import CommandFailed, LockLost, PipelinePermanent, zfs_error

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
) -> PipelineResult:
    stages = [send, Stage(pv_argv(speed_limit_mb), "local"), receive]
    results = [StageResult(s) for s in stages]
    sent = [0]

    def on_bytes(n: int) -> None:
        sent[0] = n
        if progress is not None:
            progress(n)

    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    stderr_bufs: list[list[str]] = [[] for _ in stages]
    stdin = subprocess.DEVNULL
    try:
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            proc = subprocess.Popen(
                stage.argv,
                stdin=stdin,
                stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # so a kill reaches the stage and not the worker
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
        _wait_all(procs, cancel, timeout, started)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for reader in readers:
            reader.join(timeout=5)
    for res, proc, buf in zip(results, procs, stderr_bufs, strict=False):
        res.exit_code = proc.returncode
        res.stderr = "".join(buf).strip()
    if cancel is not None and cancel.is_set():
        raise LockLost("the dataset lock was lost during the transfer: the transfer was stopped")
    _raise_for(results)
    return PipelineResult(sent[0], time.monotonic() - started, results)


def _wait_all(
    procs: Sequence[subprocess.Popen[bytes]], cancel: threading.Event | None, timeout: float | None, t0: float
) -> None:
    while any(p.poll() is None for p in procs):
        if cancel is not None and cancel.is_set():
            break
        if timeout is not None and time.monotonic() - t0 > timeout:
            break
        # a dead stage means the rest can only fail: stop them instead of waiting on a stalled pipe
        if any(p.returncode not in (None, 0) for p in procs):
            time.sleep(0.5)
            break
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

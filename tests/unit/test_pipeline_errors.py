"""The data path `send | pv | receive` run for real with harmless local commands
(hoster_tasks/replication/pipeline.py): bytes counted by pv, every stage's failure named, cancel stops it all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hoster_tasks.errors import (
    ConnectionLost,
    DatasetNotFound,
    LockLost,
    NoSpace,
    Permanent,
    PipelinePermanent,
    Transient,
)
from hoster_tasks.replication import pipeline
from hoster_tasks.replication.pipeline import PipelineResult, Stage, pv_argv, run_pipeline

pytestmark = pytest.mark.skipif(shutil.which("pv") is None, reason="pv is not installed")

SEND_1MB = ["head", "-c", "1000000", "/dev/zero"]
RECEIVE_OK = ["sh", "-c", "cat >/dev/null"]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process run_pipeline starts (to check afterwards that none is left running)."""
    procs: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.pgid_at_start = os.getpgid(self.pid)  # Popen returns after the child's exec
            procs.append(self)

    monkeypatch.setattr(pipeline.subprocess, "Popen", Recording)
    yield procs
    for proc in procs:  # never leave anything behind, even when a test fails
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive_in_groups(pgids: set[int]) -> list[int]:
    """Processes (not zombies) still running in any of these process groups (each stage leads its own)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in pgids and state != "Z":
            alive.append(int(entry.name))
    return alive


def test_pv_argv() -> None:
    assert pv_argv(None) == ["pv", "-n", "-b", "-i", "0.5"]
    assert pv_argv(90, interval=1.0) == ["pv", "-n", "-b", "-i", "1.0", "-L", "90000000"]
    assert pv_argv(0.1) == ["pv", "-n", "-b", "-i", "0.5", "-L", "100000"]


def test_success_counts_bytes_through_pv(spawned: list[subprocess.Popen[bytes]]) -> None:
    seen: list[int] = []
    result = run_pipeline(Stage(SEND_1MB, "local"), Stage(RECEIVE_OK, "target"), progress=seen.append)
    assert isinstance(result, PipelineResult)
    assert result.bytes == 1_000_000
    assert seen and seen[-1] == 1_000_000
    assert seen == sorted(seen)
    assert [r.exit_code for r in result.stages] == [0, 0, 0]
    assert [r.stage.argv[0] for r in result.stages] == ["head", "pv", "sh"]
    assert 0 <= result.seconds < 5
    assert [p.args for p in spawned] == [SEND_1MB, pv_argv(None), RECEIVE_OK]
    assert all(p.returncode == 0 for p in spawned)


def test_receive_sees_every_byte(tmp_path: Path) -> None:
    out = tmp_path / "received"
    run_pipeline(Stage(SEND_1MB, "local"), Stage(["sh", "-c", f"cat > '{out}'"], "target"))
    assert out.stat().st_size == 1_000_000


def test_receive_out_of_space_is_no_space(spawned: list[subprocess.Popen[bytes]]) -> None:
    receive = ["sh", "-c", "echo 'cannot receive: out of space' >&2; exit 1"]
    with pytest.raises(NoSpace) as info:
        run_pipeline(Stage(SEND_1MB, "local"), Stage(receive, "target"))
    exc = info.value
    assert isinstance(exc, Permanent)
    assert exc.argv == receive
    assert exc.exit_code == 1
    assert exc.host == "target"
    assert exc.stderr.startswith("cannot receive: out of space")
    assert "stages:" in exc.stderr
    assert type(exc)(*exc.args).stderr == exc.stderr  # survives Celery's rebuild from args
    assert all(p.poll() is not None for p in spawned)


def test_receive_ssh_exit_255_is_connection_lost(spawned: list[subprocess.Popen[bytes]]) -> None:
    receive = ["sh", "-c", "echo 'Connection closed by 10.5.199.85 port 22' >&2; exit 255"]
    with pytest.raises(ConnectionLost) as info:
        run_pipeline(Stage(SEND_1MB, "local"), Stage(receive, "target"))
    exc = info.value
    assert isinstance(exc, Transient)
    assert exc.exit_code == 255
    assert exc.host == "target"
    assert exc.argv == receive
    assert all(p.poll() is not None for p in spawned)


def test_send_failing_by_itself_names_the_send(spawned: list[subprocess.Popen[bytes]]) -> None:
    send = ["sh", "-c", "echo 'cannot open x: dataset does not exist' >&2; exit 1"]
    with pytest.raises(DatasetNotFound) as info:
        run_pipeline(Stage(send, "local"), Stage(RECEIVE_OK, "target"))
    exc = info.value
    assert exc.argv == send
    assert exc.exit_code == 1
    assert exc.host == "local"
    assert "dataset does not exist" in exc.stderr
    assert all(p.poll() is not None for p in spawned)


def test_send_fails_while_receive_also_complains() -> None:
    """The send's own failure is the root cause, not the receive's complaint about a short stream."""
    send = ["sh", "-c", "head -c 1000 /dev/zero; echo 'cannot open x: dataset does not exist' >&2; exit 1"]
    receive = ["sh", "-c", "cat >/dev/null; echo 'cannot receive: failed to read from stream' >&2; exit 1"]
    with pytest.raises(DatasetNotFound) as info:
        run_pipeline(Stage(send, "local"), Stage(receive, "target"))
    assert info.value.argv == send


def test_send_failure_on_a_dataset_named_pipe_names_the_send() -> None:
    send = [
        "sh", "-c",
        "echo \"cannot open 'zroot/vm-encrypted/pipeline-ci@hourly_2024-01-01_00-33-00': dataset does not exist\" >&2;"
        " exit 1",
    ]
    receive = ["sh", "-c", "cat >/dev/null; echo 'cannot receive: failed to read from stream' >&2; exit 1"]
    with pytest.raises(DatasetNotFound) as info:
        run_pipeline(Stage(send, "local"), Stage(receive, "target"))
    assert info.value.argv == send


def test_send_broken_pipe_blames_the_receive() -> None:
    """A send that only died because the receive went away is not the root cause."""
    send = ["sh", "-c", "echo 'warning: cannot send zroot/vm@s: Broken pipe' >&2; exit 1"]
    receive = ["sh", "-c", "cat >/dev/null; echo 'cannot receive: out of space' >&2; exit 1"]
    with pytest.raises(NoSpace) as info:
        run_pipeline(Stage(send, "local"), Stage(receive, "target"))
    assert info.value.argv == receive


def test_pv_failing_alone_is_pipeline_permanent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "pv_argv", lambda *a, **k: ["sh", "-c", "cat; echo 'pv: boom' >&2; exit 3"])
    with pytest.raises(PipelinePermanent) as info:
        run_pipeline(Stage(SEND_1MB, "local"), Stage(RECEIVE_OK, "target"))
    assert info.value.exit_code == 3
    assert "pv: boom" in info.value.stderr


def test_cancel_during_slow_transfer_is_lock_lost(spawned: list[subprocess.Popen[bytes]]) -> None:
    cancel = threading.Event()
    seen: list[int] = []
    send = ["head", "-c", "50000000", "/dev/zero"]  # 500 s at 0.1 MB/s: it only ends by being stopped
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(LockLost):
            run_pipeline(
                Stage(send, "local"), Stage(RECEIVE_OK, "target"), speed_limit_mb=0.1,
                progress=seen.append, cancel=cancel,
            )
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"took {elapsed:.1f}s to stop after cancel"
    assert len(spawned) == 3
    assert spawned[1].args == pv_argv(0.1)
    assert all(p.poll() is not None for p in spawned), "a stage is still running"
    # nothing started by a stage survives either (each stage leads its own process group)
    groups = {p.pid for p in spawned}
    deadline = time.monotonic() + 2
    while _alive_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_in_groups(groups) == []
    assert all(n < 1_000_000 for n in seen)  # rate-limited: far from done


def test_each_stage_leads_its_own_process_group(spawned: list[subprocess.Popen[bytes]]) -> None:
    run_pipeline(Stage(SEND_1MB, "local"), Stage(RECEIVE_OK, "target"))
    assert len(spawned) == 3
    # start_new_session=True: a kill of a stage's group never reaches the worker
    for proc in spawned:
        assert proc.pgid_at_start == proc.pid  # type: ignore[attr-defined]
        assert proc.pgid_at_start != os.getpgrp()  # type: ignore[attr-defined]


def test_stall_clock_counts_growth_only() -> None:
    now = [100.0]
    clock = pipeline.StallClock(5, now=lambda: now[0])
    clock.saw(10)
    now[0] = 104.0
    clock.saw(10)  # pv repeats the same count while nothing moves
    assert not clock.stalled()
    now[0] = 105.5
    assert clock.stalled()
    assert clock.stalled()  # once fired, it stays fired
    assert not pipeline.StallClock(None, now=lambda: 1e9).stalled()
    finished = pipeline.StallClock(5, now=lambda: now[0])
    finished.done()
    now[0] = 1e9
    assert not finished.stalled()


def test_a_stalled_transfer_is_stopped_and_transient(spawned: list[subprocess.Popen[bytes]]) -> None:
    """100 kB, then the sender hangs with the pipe open (a link over which nothing flows)."""
    send = ["sh", "-c", "head -c 100000 /dev/zero; exec sleep 60"]
    started = time.monotonic()
    with pytest.raises(pipeline.TransferStalled) as info:
        run_pipeline(Stage(send, "local"), Stage(RECEIVE_OK, "target"), stall_seconds=1.5)
    assert isinstance(info.value, Transient)
    assert "no progress for 1.5 s after 100000 bytes" in str(info.value)
    assert time.monotonic() - started < 20
    assert not _alive_in_groups({p.pgid_at_start for p in spawned})


def test_a_slow_transfer_is_not_a_stalled_one(spawned: list[subprocess.Popen[bytes]]) -> None:
    """At 0.4 MB/s, 1 MB takes longer than the stall limit, but bytes keep moving: it completes."""
    result = run_pipeline(Stage(SEND_1MB, "local"), Stage(RECEIVE_OK, "target"), speed_limit_mb=0.4,
                          stall_seconds=1.5)
    assert result.bytes == 1_000_000
    assert result.seconds > 1.5


def test_a_receive_committing_after_the_last_byte_is_not_a_stall(spawned: list[subprocess.Popen[bytes]]) -> None:
    """Every byte went through; the receive then takes longer than the stall limit to finish (a commit)."""
    receive = ["sh", "-c", "cat >/dev/null; sleep 2.5"]
    result = run_pipeline(Stage(SEND_1MB, "local"), Stage(receive, "target"), stall_seconds=1)
    assert result.bytes == 1_000_000
    assert [r.exit_code for r in result.stages] == [0, 0, 0]

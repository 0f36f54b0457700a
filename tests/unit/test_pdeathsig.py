"""The parent-death signal (hoster_tasks/replication/pdeathsig.py), for real: children of a process that exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hoster_tasks.replication.pdeathsig import arm, die_with_parent, supported

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl")

# A parent that starts `sleep 60` (armed or not), prints its pid and exits at once. The child must not hold
# our pipes, or subprocess.run would wait for it.
PARENT = """
import subprocess, sys
from hoster_tasks.replication.pdeathsig import die_with_parent
child = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=die_with_parent() if sys.argv[1] == "armed" else None)
print(child.pid, flush=True)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger when PID 1 does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def _orphan(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PARENT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_supported_here() -> None:
    assert supported()


def test_an_armed_child_dies_with_its_parent() -> None:
    assert _gone_within(_orphan("armed"), 10)


def test_an_unarmed_child_outlives_its_parent() -> None:
    """The control: without the signal, the orphan goes on (what a stage in its own session did)."""
    pid = _orphan("unarmed")
    try:
        assert not _gone_within(pid, 1)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_on_linux_it_fires_when_the_starting_thread_exits() -> None:
    """Why stages must be started from a thread that outlives them (Celery prefork: the main thread)."""
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen(["sleep", "60"],
                                                                              preexec_fn=die_with_parent())))
    thread.start()
    thread.join()
    assert started[0].wait(timeout=10) == -signal.SIGKILL


def test_a_child_whose_parent_is_already_gone_does_not_run() -> None:
    """The race: the parent died before the signal was armed. Simulated by naming another parent."""
    with pytest.raises(subprocess.SubprocessError):
        subprocess.Popen(["true"], preexec_fn=lambda: arm(signal.SIGKILL, parent=1))

"""Processes that die with the worker that started them: a parent-death signal, armed in the child before exec.

A pipeline stage runs in its own session (so a kill of the stage never reaches the worker), which also means
a SIGKILL of the worker's process group does not reach the stage. The parent-death signal closes that gap:

- Linux, `prctl(PR_SET_PDEATHSIG)`: it fires when the *thread* that forked the child exits, not the process.
  Start such children from a thread that outlives them. Celery's prefork pool runs every task in its pool
  process's main thread, so a task's stages die exactly when that process does.
- FreeBSD, `procctl(PROC_PDEATHSIG_CTL)`: it fires when the parent process exits.

Both survive exec, except into a set-user-ID program (zfs, pv and ssh are not). Elsewhere `die_with_parent`
returns None: nothing is armed.

The libc function is looked up at import, in the parent: the child, between fork and exec, only calls it
(no import, no dlopen), which keeps `preexec_fn` safe enough in a process with threads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
P_PID = 0  # FreeBSD <sys/wait.h> idtype_t
PROC_PDEATHSIG_CTL = 11  # FreeBSD <sys/procctl.h>


class ParentGone(RuntimeError):
    """The parent exited before the signal was armed: it would never fire, so the child must not run."""


def _linux() -> Callable[[int], int]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return lambda sig: int(prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0))


def _freebsd() -> Callable[[int], int]:
    procctl = ctypes.CDLL(None, use_errno=True).procctl
    procctl.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    procctl.restype = ctypes.c_int
    return lambda sig: int(procctl(P_PID, 0, PROC_PDEATHSIG_CTL, ctypes.byref(ctypes.c_int(sig))))


def _load() -> Callable[[int], int] | None:
    if sys.platform.startswith("linux"):
        return _linux()
    if sys.platform.startswith("freebsd"):
        return _freebsd()
    return None


_SET_SIGNAL = _load()


def supported() -> bool:
    return _SET_SIGNAL is not None


def arm(sig: int, parent: int) -> None:
    """In the child: deliver `sig` to this process when `parent` goes away.

    Re-checks the parent afterwards: if it died between fork and here, this process was already re-parented
    and the signal will never come.
    """
    if _SET_SIGNAL is None:
        return
    if _SET_SIGNAL(sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot set the parent-death signal: {os.strerror(err)}")
    if os.getppid() != parent:
        raise ParentGone(f"parent {parent} exited before the parent-death signal was set")


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: the child gets `sig` when the calling thread (Linux) or process exits."""
    if _SET_SIGNAL is None:
        return None
    parent = os.getpid()
    return lambda: arm(sig, parent)

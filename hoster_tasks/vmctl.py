"""Stopping, starting and asking whether a VM runs: one small interface, two implementations.

- `HosterControl` runs Hoster's own commands (`hoster vm stop NAME`, `hoster vm start NAME`) and asks
  whether the VM runs with a command whose exit status says so (bhyve keeps `/dev/vmm/<name>` while a VM
  runs). Each command line is an argv template from settings; `{vm}` is replaced within an argument, after
  the name was validated, so no shell ever sees it.
- `FileControl` keeps each VM's state in a JSON file and logs every call: for tests and the sandbox, where
  there is no bhyve.

`stop_confirmed` is what every destructive operation uses: it stops the VM and polls until it is off,
bounded, before anything touches the disk.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from hoster_tasks.errors import CommandFailed, VmControlError
from hoster_tasks.names import validate_vm
from hoster_tasks.settings import Settings

COMMAND_TIMEOUT = 300.0
POLL_SECONDS = 0.5


class VmControl(Protocol):
    def is_running(self, vm: str) -> bool: ...

    def stop(self, vm: str) -> None: ...

    def start(self, vm: str) -> None: ...

    def cireset(self, vm: str) -> str: ...


def _argv(template: Sequence[str], vm: str) -> list[str]:
    validate_vm(vm)
    return [part.replace("{vm}", vm) for part in template]


class HosterControl:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _run(self, template: Sequence[str], vm: str) -> subprocess.CompletedProcess[str]:
        argv = _argv(template, vm)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandFailed(argv, -1, str(exc)) from None

    def is_running(self, vm: str) -> bool:
        return self._run(self.settings.vm_running_command, vm).returncode == 0

    def stop(self, vm: str) -> None:
        self._checked(self.settings.vm_stop_command, vm)

    def start(self, vm: str) -> None:
        self._checked(self.settings.vm_start_command, vm)

    def cireset(self, vm: str) -> str:
        return self._checked(self.settings.vm_cireset_command, vm)

    def _checked(self, template: Sequence[str], vm: str) -> str:
        res = self._run(template, vm)
        if res.returncode != 0:
            raise CommandFailed(res.args, res.returncode, res.stderr or res.stdout)
        return (res.stdout or res.stderr).strip()


class FileControl:
    """VM state in a JSON file: {"vms": {name: "running" | "stopped"}, "calls": [[verb, name], ...]}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # workers and tests read and write it at once
            try:
                state = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            state.setdefault("vms", {})
            state.setdefault("calls", [])
            yield state
            self.path.write_text(json.dumps(state, indent=1))

    def is_running(self, vm: str) -> bool:
        with self._state() as state:
            return bool(state["vms"].get(validate_vm(vm)) == "running")

    def stop(self, vm: str) -> None:
        self._set(vm, "stop", "stopped")

    def start(self, vm: str) -> None:
        self._set(vm, "start", "running")

    def cireset(self, vm: str) -> str:
        with self._state() as state:
            state["calls"].append(["cireset", validate_vm(vm)])
            if state.get("fail") == "cireset":
                raise VmControlError(f"cireset of VM {vm} failed (as the state file asked)")
        return f"{vm}: guest settings reset"

    def _set(self, vm: str, verb: str, status: str) -> None:
        with self._state() as state:
            state["calls"].append([verb, validate_vm(vm)])
            if state.get("fail") == verb:  # a test asks this verb to fail
                raise VmControlError(f"{verb} of VM {vm} failed (as the state file asked)")
            state["vms"][vm] = status


def vm_control(settings: Settings) -> VmControl:
    if settings.vm_control == "file":
        if settings.vm_state_file is None:
            raise VmControlError("vm_control = 'file' needs vm_state_file")
        return FileControl(settings.vm_state_file)
    return HosterControl(settings)


def stop_confirmed(ctl: VmControl, vm: str, timeout: float, poll: float = POLL_SECONDS) -> None:
    """Stop `vm` and wait until it is off; a VM still running after `timeout` is an error (nothing else ran)."""
    ctl.stop(vm)
    deadline = time.monotonic() + timeout
    while ctl.is_running(vm):
        if time.monotonic() >= deadline:
            raise VmControlError(f"VM {vm} still runs {timeout:.0f}s after it was told to stop: nothing was changed")
        time.sleep(poll)

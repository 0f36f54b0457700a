"""Real `hoster-tasks beat` processes (celery-redbeat) for the standby and Sentinel tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.proc import stop_process, tail
from scenario import PROJECT_ROOT

from hoster_tasks import keys

SENT = "Scheduler: Sending due task"


def every_minute(stype: str = "frequent", keep: int = 20, name: str = "t") -> str:
    return json.dumps({name: {"cron": "* * * * *", "stype": stype, "keep": keep}})


class BeatProcess:
    """One beat in its own process group. Short loop and lock timeout, so a standby takes over in seconds."""

    def __init__(self, workdir: Path, redis_url: str, **env: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "beat.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
        base.update({"PYTHONUNBUFFERED": "1", "HOSTER_NODE_NAME": "control", "HOSTER_REDIS_URL": redis_url,
                     "HOSTER_SNAPSHOT_SCHEDULE": every_minute(), "HOSTER_BEAT_MAX_LOOP_SECONDS": "1",
                     "HOSTER_BEAT_LOCK_TIMEOUT_SECONDS": "5"})
        base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in env.items()})
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hoster_tasks", "beat"], cwd=PROJECT_ROOT, env=base, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sent(self, entry: str = "snapshot-t") -> int:
        """How many times this beat fired `entry`."""
        return self.log.count(f"{SENT} {entry} ")

    @property
    def holds_lock(self) -> bool:
        return "beat: Acquired lock" in self.log

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """A host gone: SIGKILL, the lock stays until its timeout."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15, group=True)

    def tail(self) -> str:
        return f"----- beat {self.log_path} (exit {self.proc.poll()}) -----\n{tail(self.log_path)}"


def entry_key(name: str) -> str:
    return f"{keys.BEAT_KEY_PREFIX}{name}"  # RedBeat's own naming: <prefix><entry name>

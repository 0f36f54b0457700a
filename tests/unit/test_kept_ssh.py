"""kept_ssh: one SSH control connection per endpoint and worker process, never shared across a fork."""

from __future__ import annotations

from typing import Any

from hoster_tasks.settings import Endpoint
from hoster_tasks.zfs import shell as shell_mod


def test_one_shell_per_endpoint_and_process(monkeypatch: Any) -> None:
    a = Endpoint(name="b1", host="10.0.0.1")
    b = Endpoint(name="b2", host="10.0.0.2")
    first = shell_mod.kept_ssh(a)
    assert shell_mod.kept_ssh(Endpoint(name="b1", host="10.0.0.1")) is first
    assert shell_mod.kept_ssh(b) is not first
    assert shell_mod.kept_ssh(a.model_copy(update={"port": 2222})) is not first  # other settings, other shell

    monkeypatch.setattr(shell_mod.os, "getpid", lambda: -42)  # a forked child (Celery prefork)
    child = shell_mod.kept_ssh(a)
    assert child is not first  # its own, opened on first use; the parent's is never touched


def test_a_tasks_close_keeps_the_connection(monkeypatch: Any) -> None:
    kept = shell_mod.KeptSshShell(Endpoint(name="b1", host="10.0.0.1"))
    dropped: list[bool] = []
    monkeypatch.setattr(kept, "_drop", lambda: dropped.append(True))
    kept.close()
    assert dropped == []

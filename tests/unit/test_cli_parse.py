"""The `hoster-tasks` command line (hoster_tasks/cli/main.py): parsing, and one-line errors."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator

import pytest

from hoster_tasks.cli.main import build_parser, main
from hoster_tasks.settings import get_settings


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, never listened, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Settings for `main()`: Redis on a closed port. The cached settings and any Celery app built from
    them are dropped afterwards, so no later test sees this broker URL."""
    for key in list(os.environ):
        if key.upper().startswith("HOSTER_"):
            monkeypatch.delenv(key)
    url = "redis://127.0.0.1:1/0"
    monkeypatch.setenv("HOSTER_REDIS_URL", url)
    monkeypatch.setenv("HOSTER_NODE_NAME", "node-a")
    had_app = "hoster_tasks.celery_app" in sys.modules
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    if not had_app:
        sys.modules.pop("hoster_tasks.celery_app", None)
        import hoster_tasks

        if hasattr(hoster_tasks, "celery_app"):
            delattr(hoster_tasks, "celery_app")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["snapshot", "new", "web1"],
         {"group": "snapshot", "cmd": "new", "vm": "web1", "stype": "custom", "keep": None}),
        (["snapshot", "new", "web1", "--stype", "daily", "--keep", "5", "--no-wait"],
         {"stype": "daily", "keep": 5, "no_wait": True}),
        (["snapshot", "all", "--stype", "hourly", "--keep", "3"],
         {"cmd": "all", "stype": "hourly", "keep": 3, "node": None, "no_wait": False, "json": False}),
        (["snapshot", "all", "--stype", "monthly", "--keep", "6", "--node", "hoster02", "--json"],
         {"node": "hoster02", "json": True}),
        (["snapshot", "list", "web1", "--json"], {"cmd": "list", "vm": "web1", "json": True}),
        (["snapshot", "list-all"], {"cmd": "list-all", "json": False}),
        (["snapshot", "destroy", "zroot/vm-encrypted/web1@hourly_2024-01-01_00-33-00"],
         {"cmd": "destroy", "snapshot": "zroot/vm-encrypted/web1@hourly_2024-01-01_00-33-00"}),
        (["vm", "replicate", "web1", "--endpoint", "hoster01", "--speed-limit", "90"],
         {"group": "vm", "cmd": "replicate", "vm": "web1", "endpoint": "hoster01", "speed_limit": 90.0}),
        (["vm", "replicate-all", "--endpoint", "hoster01", "--filter", "a,b", "--script-name", "to_hoster01"],
         {"cmd": "replicate-all", "filter": "a,b", "script_name": "to_hoster01", "speed_limit": None}),
        (["worker"], {"group": "worker", "concurrency": 4, "loglevel": "INFO"}),
        (["worker", "-c", "2", "-l", "DEBUG"], {"concurrency": 2, "loglevel": "DEBUG"}),
        (["beat"], {"group": "beat", "loglevel": "INFO"}),
        (["flower", "--port", "5556", "--basic-auth", "u:p"],
         {"group": "flower", "port": 5556, "address": "127.0.0.1", "basic_auth": "u:p"}),
        (["status", "--json"], {"group": "status", "json": True}),
        (["metrics", "--textfile", "/tmp/x.prom"], {"group": "metrics", "textfile": "/tmp/x.prom"}),
    ],
)
def test_documented_commands_parse(argv: list[str], expected: dict[str, object]) -> None:
    args = vars(build_parser().parse_args(argv))
    for key, value in expected.items():
        assert args[key] == value, key


@pytest.mark.parametrize(
    "argv",
    [
        ["snapshot", "all", "--stype", "hourly", "--keep", "0"],
        ["snapshot", "all", "--stype", "hourly", "--keep", "-1"],
        ["snapshot", "all", "--stype", "hourly", "--keep", "three"],
        ["snapshot", "new", "web1", "--keep", "0"],
        ["snapshot", "all", "--stype", "hourly"],  # --keep is required
        ["snapshot", "all", "--keep", "3"],  # --stype is required
        ["snapshot", "all", "--stype", "minutely", "--keep", "3"],
        ["vm", "replicate", "web1"],  # --endpoint is required
        ["vm", "replicate", "web1", "--endpoint", "h", "--speed-limit", "fast"],
        ["snapshot"],
        ["vm"],
        [],
        ["frobnicate"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: hoster-tasks" in capsys.readouterr().err


def test_keep_zero_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["snapshot", "all", "--stype", "hourly", "--keep", "0"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hoster-tasks: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_unreachable_redis_is_one_line(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["snapshot", "list-all"])
    out, err = capsys.readouterr()
    assert code == 1
    line = _one_error_line(err)
    assert "cannot reach the broker" in line
    assert "127.0.0.1:1" in line
    assert out == ""


def test_unreachable_redis_hides_the_password(
    cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    monkeypatch.setenv("HOSTER_REDIS_URL", f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    code = main(["snapshot", "list-all"])
    err = capsys.readouterr().err
    assert code == 1
    line = _one_error_line(err)
    assert f"127.0.0.1:{port}" in line
    assert "s3cret-pw" not in err


def test_invalid_vm_name_is_one_line_before_any_connection(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["snapshot", "list", "a;rm -rf /"])
    err = capsys.readouterr().err
    assert code == 1
    line = _one_error_line(err)
    assert "invalid VM name" in line
    assert "cannot reach the broker" not in line


def test_invalid_settings_is_one_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTER_LOCK_LEASE_SECONDS", "-1")
    monkeypatch.setenv("HOSTER_RETRY_MAX", "many")
    code = main(["snapshot", "new", "vm1"])  # (`snapshot list` reads only redis_url: see the light path's test)
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "lock_lease_seconds" in line and "retry_max" in line


def test_the_light_path_refuses_an_invalid_redis_url_in_one_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTER_REDIS_URL", "sentinel://")
    code = main(["snapshot", "list-all"])
    assert code == 1
    assert "invalid settings: redis_url" in _one_error_line(capsys.readouterr().err)


def test_invalid_settings_exit_1_without_traceback(
    cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTER_LOCK_LEASE_SECONDS", "-1")
    code = main(["snapshot", "new", "vm1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("hoster-tasks: error: invalid settings:")
    assert "lock_lease_seconds" in err
    assert "Traceback" not in err

"""docker/redis/start.sh, run for real against the local redis-server: the password from the secret file
protects Redis, and it is on no command line and in no file in plain text.

The image's docker-entrypoint.sh is replaced by a stub that runs its arguments (the real one only drops to
the `redis` user first); the secret, ACL and config paths are moved into the test's directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harness.proc import free_port, stop_process, wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "docker" / "redis" / "start.sh"
PASSWORD = "0123456789abcdef0123456789abcdef"


def client(port: int, password: str | None = None) -> redis.Redis:
    # no retries: redis-py retries a refused login (an AuthenticationError is a ConnectionError) with backoff
    return redis.Redis(port=port, password=password, socket_timeout=2, retry=Retry(NoBackoff(), 0))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (CI=true: failing instead of skipping)")
        pytest.skip("redis-server is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "docker-entrypoint.sh"
    stub.write_text('#!/bin/sh\nexec "$@"\n')
    stub.chmod(0o755)
    (tmp_path / "secret").write_text(PASSWORD + "\n")  # a trailing newline, as an editor leaves it
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REDIS_PASSWORD_FILE": str(tmp_path / "secret"),
        "REDIS_ACL_FILE": str(tmp_path / "run" / "users.acl"),
        "REDIS_CONF": str(ROOT / "docker" / "redis" / "redis.conf"),
    }


@pytest.fixture
def started(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    argv = ["sh", str(START), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--appendonly", "no", "--save", ""]
    with open(tmp_path / "redis.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "redis.log").read_text()
        try:
            with client(port, PASSWORD) as c:
                return bool(c.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, 15, "redis-server started by start.sh")
        yield proc, port
    finally:
        stop_process(proc, timeout=10)


def test_the_password_from_the_secret_file_protects_redis(started: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = started
    with client(port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with client(port, "wrong") as wrong, pytest.raises(redis.AuthenticationError):
        wrong.ping()
    with client(port, PASSWORD) as c:
        assert c.config_get("appendfsync") == {"appendfsync": "everysec"}  # redis.conf was read
        assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_the_password_is_on_no_command_line_and_in_no_file(
    started: tuple[subprocess.Popen[bytes], int], env: dict[str, str]
) -> None:
    proc, _ = started
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"redis-server" in cmdline[0]  # start.sh and the entrypoint exec'd into it
    assert PASSWORD.encode() not in b" ".join(cmdline)
    acl = Path(env["REDIS_ACL_FILE"])
    assert PASSWORD not in acl.read_text()  # only its SHA-256
    assert stat.S_IMODE(acl.stat().st_mode) == 0o600


@pytest.mark.parametrize("password", ["", "has space", "semi;colon", "new\nline"])
def test_a_password_that_is_not_url_safe_is_refused(env: dict[str, str], password: str) -> None:
    Path(env["REDIS_PASSWORD_FILE"]).write_text(password)
    res = subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1 and "URL-safe" in res.stderr
    assert not Path(env["REDIS_ACL_FILE"]).exists()

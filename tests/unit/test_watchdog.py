"""The transfer's watchdog (hoster_tasks/replication/watchdog.py): its decision on a fake clock, then the real
process guarding a real pipeline against a Redis that does not answer (no Redis needed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from hoster_tasks.errors import LockLost, PipelinePermanent
from hoster_tasks.replication.pipeline import Stage, run_pipeline
from hoster_tasks.replication.watchdog import SLACK, LeaseWatch, Lost, Watchdog, lease_left, next_wait, watch

LOCKS = (("hoster:lock:a:pool/vm/x", "v1"), ("hoster:lock:b:pool/vm/x", "v2"))
SPEC = LeaseWatch("redis://:secret@127.0.0.1:6379/0", LOCKS, lease_seconds=6.0, interval=2.0)


# -- reading the leases ---------------------------------------------------------------------------------------
def test_lease_left_is_the_shortest_lease_while_every_key_is_ours() -> None:
    assert lease_left([(b"v1", 5500), (b"v2", 4200)], SPEC) == 4.2


def test_a_key_that_is_gone_or_holds_another_value_is_lost() -> None:
    assert lease_left([(b"v1", 5500), (None, -2)], SPEC) == Lost(LOCKS[1][0], "expired")
    assert lease_left([(b"intruder", 5500), (b"v2", 4200)], SPEC) == Lost(LOCKS[0][0], "taken")


def test_a_key_without_expiry_counts_a_full_lease() -> None:
    assert lease_left([(b"v1", -1), (b"v2", -1)], SPEC) == SPEC.lease_seconds


def test_next_wait_is_one_interval_or_just_past_the_shortest_lease() -> None:
    assert next_wait(2.0, 5.0) == 2.0
    assert next_wait(2.0, 0.5) == 0.5 + SLACK
    assert next_wait(2.0, -3.0) == SLACK  # past it already: look again at once


# -- the loop, on a fake clock --------------------------------------------------------------------------------
class Script:
    """Answers `poll` from a list ("down": Redis does not answer); time passes only in `done_within`."""

    def __init__(self, answers: list[float | Lost | str], done_after: int | None = None) -> None:
        self.answers = list(answers)
        self.now = 100.0
        self.polls: list[float] = []
        self.done_after = done_after

    def clock(self) -> float:
        return self.now

    def poll(self) -> float | Lost:
        self.polls.append(self.now)
        answer = self.answers.pop(0) if self.answers else "down"
        if answer == "down":
            raise redis.ConnectionError("refused")
        assert not isinstance(answer, str)
        return answer

    def done_within(self, seconds: float) -> bool:
        self.now += seconds
        return self.done_after is not None and len(self.polls) >= self.done_after

    def run(self) -> Lost | None:
        return watch(SPEC, self.poll, self.done_within, self.clock)


def test_held_leases_let_the_stages_finish() -> None:
    script = Script([6.0, 5.9, 6.0], done_after=3)
    assert script.run() is None
    assert script.polls == [100.0, 102.0, 104.0]  # one look per renewal interval


def test_a_lost_key_kills_at_the_next_look() -> None:
    script = Script([6.0, Lost(LOCKS[0][0], "expired")])
    assert script.run() == Lost(LOCKS[0][0], "expired")
    assert script.polls == [100.0, 102.0]


def test_a_short_lease_is_looked_at_again_right_after_it_runs_out() -> None:
    script = Script([0.5, Lost(LOCKS[1][0], "expired")])
    assert script.run() == Lost(LOCKS[1][0], "expired")
    assert script.polls == [100.0, 100.5 + SLACK]


def test_unreachable_redis_kills_once_the_last_lease_seen_ran_out_and_not_before() -> None:
    script = Script([3.0])  # then Redis never answers again
    lost = script.run()
    assert lost == Lost(",".join(k for k, _ in LOCKS), "unreachable")
    assert script.now >= 103.0  # the lease seen at 100.0 had 3 s left: the lock may have been ours until then
    assert script.now <= 103.0 + SLACK


def test_unreachable_from_the_start_counts_a_full_lease() -> None:
    script = Script([])
    assert script.run() is not None
    assert 106.0 <= script.now <= 106.0 + SLACK


def test_a_brief_outage_within_the_lease_is_survived() -> None:
    script = Script([6.0, "down", "down", 6.0, 6.0], done_after=5)
    assert script.run() is None


# -- the spec -------------------------------------------------------------------------------------------------
def test_the_redis_url_stays_out_of_the_repr() -> None:
    assert "secret" not in repr(SPEC)


def test_of_takes_the_locks_in_hand() -> None:
    class Spec:
        lease = 4.5

    class Lock:
        spec = Spec()

        def __init__(self, key: str, value: str) -> None:
            self.key, self.value = key, value

    spec = LeaseWatch.of("redis://x", [Lock(k, v) for k, v in LOCKS])  # type: ignore[misc]
    assert spec == LeaseWatch("redis://x", LOCKS, 4.5, 1.5)
    assert LeaseWatch.of("redis://x", []) is None


# -- the real process -----------------------------------------------------------------------------------------
needs_pv = pytest.mark.skipif(shutil.which("pv") is None, reason="pv is not installed")
SLOW_SEND = ["head", "-c", "50000000", "/dev/zero"]  # 500 s at 0.1 MB/s: it only ends by being stopped
RECEIVE = ["sh", "-c", "cat >/dev/null"]


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


@pytest.fixture
def dead_redis() -> Iterator[str]:
    """A Redis URL nothing answers on (a port bound and never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"redis://:secret@127.0.0.1:{sock.getsockname()[1]}/0"


def _watchdogs_of_this_process() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"replication.watchdog" not in (entry / "cmdline").read_bytes():
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@needs_pv
def test_the_watchdog_stops_a_transfer_whose_lease_ran_out(dead_redis: str) -> None:
    spec = LeaseWatch(dead_redis, LOCKS, lease_seconds=1.0, interval=0.3)
    # timeout: only a safety net; reaching it fails the test (a stage error, not LockLost)
    with pytest.raises(LockLost, match="Redis stayed unreachable until its lease ran out"):
        run_pipeline(Stage(SLOW_SEND, "local"), Stage(RECEIVE, "t"), speed_limit_mb=0.1, lease=spec, timeout=60)
    kept = _watchdogs_of_this_process()
    assert len(kept) <= 1  # kept for the next transfer, which it serves:
    quick = LeaseWatch(dead_redis, LOCKS, lease_seconds=60.0, interval=20.0)
    assert run_pipeline(Stage(["head", "-c", "1000", "/dev/zero"], "local"), Stage(RECEIVE, "t"), lease=quick).bytes
    assert _watchdogs_of_this_process() == kept or len(_watchdogs_of_this_process()) == 1


@needs_pv
def test_a_transfer_that_ends_in_its_lease_is_not_disturbed_and_its_watchdog_is_kept(dead_redis: str) -> None:
    spec = LeaseWatch(dead_redis, LOCKS, lease_seconds=60.0, interval=20.0)
    result = run_pipeline(Stage(["head", "-c", "100000", "/dev/zero"], "local"), Stage(RECEIVE, "t"), lease=spec)
    assert result.bytes == 100000
    [kept] = _watchdogs_of_this_process()  # one, idle: the next transfer's
    again = run_pipeline(Stage(["head", "-c", "1000", "/dev/zero"], "local"), Stage(RECEIVE, "t"), lease=spec)
    assert again.bytes == 1000
    assert _watchdogs_of_this_process() == [kept]  # the same process served it: no new start-up


def test_after_ended_it_kills_nothing_of_that_transfer(dead_redis: str) -> None:
    """The guarantee the parent reaps the stages on: once `stop` returned, a lease running out afterwards
    (Redis unreachable from the start: 1 s) kills nothing, whatever now has those process groups."""
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        dog = Watchdog(LeaseWatch(dead_redis, LOCKS, lease_seconds=1.0, interval=0.3))
        dog.guard([sleeper.pid])
        assert dog.stop() is None
        time.sleep(2.0)  # twice the lease: a watch still running would have killed it by now
        assert sleeper.poll() is None
        dog = Watchdog(LeaseWatch(dead_redis, LOCKS, lease_seconds=1.0, interval=0.3))
        dog.guard([sleeper.pid])
        wait_for(dog.exited, 10)  # while watched, the same lapse kills it
        assert isinstance(dog.stop(), LockLost)
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


def test_a_kept_watchdog_that_died_is_replaced(dead_redis: str) -> None:
    spec = LeaseWatch(dead_redis, LOCKS, lease_seconds=60.0, interval=20.0)
    first = Watchdog(spec)
    assert first.stop() is None
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    second = Watchdog(spec)
    try:
        assert second.proc.pid != first.proc.pid and second.proc.poll() is None
    finally:
        assert second.stop() is None


@needs_pv
def test_a_watchdog_that_fails_stops_the_transfer() -> None:
    spec = LeaseWatch("nonsense://", LOCKS, lease_seconds=60.0, interval=20.0)
    with pytest.raises(PipelinePermanent, match="watchdog failed"):
        run_pipeline(Stage(SLOW_SEND, "local"), Stage(RECEIVE, "t"), speed_limit_mb=0.1, lease=spec, timeout=60)


def test_the_redis_url_never_reaches_argv(dead_redis: str) -> None:
    dog = Watchdog(LeaseWatch(dead_redis, LOCKS, 60.0, 20.0))
    try:
        cmdline = Path(f"/proc/{dog.proc.pid}/cmdline").read_bytes()
        assert b"secret" not in cmdline and b"redis://" not in cmdline
    finally:
        assert dog.stop() is None  # stopped before it guarded anything: no verdict

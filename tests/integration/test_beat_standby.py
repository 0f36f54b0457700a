"""Beat on two hosts (hoster_tasks/beat.py): one fires, the other stands by and takes over; one snapshot per
VM per slot even when a slot's fan-out arrives twice; a slot no beat fired is logged and counted.

Real beats (celery-redbeat) on an every-minute schedule, a real worker, zfs-fuse: minutes, not seconds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from beats import BeatProcess, entry_key, every_minute
from harness import zfs as hz
from harness.proc import HarnessError, wait_until
from redbeat.decoder import RedBeatJSONEncoder
from scenario import make_vms, node_env

from hoster_tasks import keys
from hoster_tasks.names import parse_snapshot_name


@pytest.fixture
def beats(redis_server, redis_client, tmp_path: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """`beats(**env) -> BeatProcess` on the shared (flushed) Redis; all stopped after the test."""
    started: list[BeatProcess] = []

    def start(**env: Any) -> BeatProcess:
        started.append(BeatProcess(tmp_path / f"beat-{len(started)}", redis_server.url, **env))
        return started[-1]

    yield start
    for b in started:
        b.stop()


def _wait(what: str, predicate: Any, timeout: float, *procs: BeatProcess) -> Any:
    try:
        return wait_until(predicate, timeout, what, interval=0.3)
    except HarnessError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(p.tail() for p in procs)) from None


def _slots(dataset: str, stype: str = "frequent") -> list[datetime]:
    """The slot times of the dataset's snapshots of `stype` (names carry the slot), in order."""
    names = [parse_snapshot_name(s.short) for s in hz.snapshots(dataset)]
    return sorted(n.taken_at for n in names if n is not None and n.stype == stype)  # a -1 twin shows twice


def test_two_beats_fire_each_slot_once_and_the_standby_takes_over_when_the_active_one_dies(
    pool_factory, worker_factory, beats, app, redis_client
):
    pool = pool_factory()
    vms = make_vms(pool, "a", "b")
    worker_factory("n1", node_env(pool))
    active = beats()
    _wait("the first beat to take the beat lock", lambda: active.holds_lock, 30, active)
    standby = beats()
    _wait("the second beat to start and wait", lambda: "beat: Starting..." in standby.log, 30, standby)

    _wait("a slot's snapshots", lambda: all(len(_slots(vm)) >= 1 for vm in vms), 75, active, standby)
    active.kill()  # its lock stays until beat_lock_timeout_seconds (5 s)
    first = _slots(vms[0])[0]
    _wait("the standby to fire the next slot", lambda: all(len(_slots(vm)) >= 2 for vm in vms), 75, standby)

    assert standby.holds_lock
    assert active.sent() == 1 and standby.sent() >= 1  # both ran at the first slot: only one fired it
    for vm in vms:
        assert _slots(vm)[:2] == [first, first + timedelta(minutes=1)], hz.snapshots(vm)  # one per slot, none lost
    assert redis_client.hget(keys.BEAT_MISSED, "snapshot-t") is None  # nothing missed: none counted

    # belt and braces: a second fan-out of the slot the standby fired (a beat without the lock) takes nothing
    second = int((first + timedelta(minutes=1)).timestamp())
    jobs = app.send_task("hoster.snapshot.fanout", args=["frequent", 20], kwargs={"slot": second},
                         queue=keys.CONTROL_QUEUE).get(timeout=30)
    assert app.AsyncResult(jobs["n1"]).get(timeout=30)["taken"] == []
    for vm in vms:
        assert _slots(vm).count(first + timedelta(minutes=1)) == 1


def _age(client: Any, entry: str, last_run_at: datetime) -> None:
    meta = json.dumps({"last_run_at": last_run_at, "total_run_count": 1}, cls=RedBeatJSONEncoder)
    client.hset(entry_key(entry), "meta", meta)


def test_a_slot_no_beat_fired_is_logged_and_counted_and_removed_entries_disappear(beats, redis_client):
    both = json.dumps({**json.loads(every_minute()), **json.loads(every_minute(name="gone"))})
    first = beats(HOSTER_SNAPSHOT_SCHEDULE=both)
    _wait("the beat to store its entries", lambda: first.holds_lock, 30, first)
    first.stop()  # releases the lock
    assert redis_client.exists(entry_key("snapshot-gone"))

    # every beat was down for three and a half minutes
    down_since = datetime.now(UTC) - timedelta(minutes=3, seconds=30)
    _age(redis_client, "snapshot-t", down_since)
    again = beats()  # the settings no longer have "gone"
    _wait("the overdue entry to fire", lambda: again.sent() >= 1, 30, again)

    # 3.5 minutes hold 3 or 4 ticks (one more if a minute turned since): all but the one fired were missed
    missed = int(redis_client.hget(keys.BEAT_MISSED, "snapshot-t") or 0)
    assert 2 <= missed <= 4, again.log
    assert f"snapshot-t missed {missed} slot(s)" in again.log
    assert not redis_client.exists(entry_key("snapshot-gone"))
    assert entry_key("snapshot-gone") not in redis_client.zrange(f"{keys.BEAT_KEY_PREFIX}:schedule", 0, -1)

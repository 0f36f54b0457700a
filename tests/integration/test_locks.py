"""The dataset lock against a real redis-server: one holder, handoff between chain links, fencing."""

from __future__ import annotations

import time

import pytest
import redis

from hoster_tasks.errors import Busy, DuplicateDelivery, LockLost
from hoster_tasks.locks import DatasetLock, LockSpec


@pytest.fixture
def client(redis_server) -> redis.Redis:  # type: ignore[no-untyped-def]
    c = redis.Redis.from_url(redis_server.url)
    c.flushall()
    return c


def spec(lease: float = 5, wait: float = 0.3) -> LockSpec:
    return LockSpec("n1", "pool/vm/a", lease=lease, wait=wait)


def test_a_holder_whose_lease_expired_is_fenced_off_before_anything_destructive(client: redis.Redis) -> None:
    old = DatasetLock(client, spec(lease=0.5)).acquire()
    old.stop_heartbeat()  # a frozen worker: nothing renews its lease
    time.sleep(0.7)
    new = DatasetLock(client, spec()).acquire()
    with pytest.raises(LockLost):
        old.check()
    old.release()  # a compare-and-delete: the new holder keeps its lock
    new.check()
    new.release()


def test_a_retaken_lock_fails_the_fence_even_if_the_value_were_reused(client: redis.Redis) -> None:
    first = DatasetLock(client, spec()).acquire()
    fence = first.fence
    first.release()
    again = DatasetLock(client, spec())
    again.value = first.value  # same value, later acquisition: the fence tells them apart
    again.acquire()
    assert again.fence == fence + 1
    with pytest.raises(LockLost):
        first.check()
    again.release()


def test_a_link_hands_the_lock_to_exactly_one_next_link(client: redis.Redis) -> None:
    link1 = DatasetLock(client, spec(), chain="c1").acquire()
    handoff = link1.hand_off()
    link2 = DatasetLock(client, spec(), chain="c1").claim(handoff)
    twin = DatasetLock(client, spec(), chain="c1")  # a second delivery of the same link
    with pytest.raises(DuplicateDelivery):
        twin.claim(handoff)
    with pytest.raises(Busy):  # anyone else waits
        DatasetLock(client, spec()).acquire()
    link2.check()
    link2.release()
    assert client.get(link2.key) is None


def test_a_first_link_delivered_twice_runs_once(client: redis.Redis) -> None:
    DatasetLock(client, spec(), chain="c2").claim(None)
    with pytest.raises(DuplicateDelivery):
        DatasetLock(client, spec(), chain="c2").claim(None)


def test_the_heartbeat_notices_a_stolen_lock(client: redis.Redis) -> None:
    lost = []
    lock = DatasetLock(client, spec(lease=0.6), on_lost=lambda: lost.append(True)).acquire()
    client.set(lock.key, "intruder", px=5000)
    time.sleep(0.8)
    assert lost and lock.lost.is_set()
    lock.release()
    assert client.get(lock.key) == b"intruder"


def test_snapshot_jobs_share_a_dataset_and_only_a_rollback_excludes_them(client: redis.Redis) -> None:
    from hoster_tasks.locks import join_takers, leave_takers, wait_for_takers

    first, second = join_takers(client, "n1", "pool/vm/a", 5), join_takers(client, "n1", "pool/vm/a", 5)
    assert first and second  # two snapshot jobs at once: fine
    rollback = DatasetLock(client, LockSpec("n1", "pool/vm/a", lease=5, wait=0.3, kind="snapshot")).acquire()
    assert join_takers(client, "n1", "pool/vm/a", 5) is None  # no new one while a rollback holds it
    with pytest.raises(Busy):  # and the rollback waits for the running ones
        wait_for_takers(client, "n1", "pool/vm/a", 0.3)
    leave_takers(client, "n1", "pool/vm/a", first)
    leave_takers(client, "n1", "pool/vm/a", second)
    wait_for_takers(client, "n1", "pool/vm/a", 0.3)
    rollback.release()
    assert join_takers(client, "n1", "pool/vm/a", 5)


def test_a_dead_snapshot_job_does_not_block_a_rollback_past_its_lease(client: redis.Redis) -> None:
    from hoster_tasks.locks import join_takers, wait_for_takers

    assert join_takers(client, "n1", "pool/vm/b", 0.3)  # its worker dies: it never leaves
    time.sleep(0.4)
    wait_for_takers(client, "n1", "pool/vm/b", 0.2)

"""locks.LockGroup on a real private Redis: many dataset locks taken, renewed and released together, each one
excluding a DatasetLock on the same dataset (and the other way round), with its own value and fence, its
check() stopping the work once it is lost, and release() never deleting a lock someone else holds now."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from hoster_tasks import keys
from hoster_tasks.errors import Busy, LockLost
from hoster_tasks.locks import DatasetLock, LockGroup, LockSpec

NODE = "n1"
DS = [f"tank/vm/vm{i}" for i in range(4)]


@pytest.fixture
def client(private_redis: Any) -> redis.Redis:
    return redis.Redis.from_url(private_redis.url)


def test_takes_the_free_ones_and_excludes_single_locks(client: redis.Redis) -> None:
    with DatasetLock(client, LockSpec(NODE, DS[1], lease=30, wait=0)):
        with LockGroup(client, NODE, lease=30) as group:
            held = group.take(DS, wait=0.3)
            assert sorted(held) == [DS[0], DS[2], DS[3]]
            for ds, lock in held.items():
                assert client.get(keys.dataset_lock(NODE, ds)) == lock.value.encode()
                assert lock.fence == int(client.get(keys.lock_fence(NODE, ds)) or 0) == 1
                lock.check()
            with pytest.raises(Busy):
                DatasetLock(client, LockSpec(NODE, DS[0], lease=30, wait=0.2)).acquire()
    assert all(client.get(keys.dataset_lock(NODE, ds)) is None for ds in DS)  # all released


def test_a_lock_lost_or_taken_over_stops_its_work_and_is_not_released_by_the_group(client: redis.Redis) -> None:
    with LockGroup(client, NODE, lease=30) as group:
        held = group.take(DS[:2], wait=0)
        client.delete(keys.dataset_lock(NODE, DS[0]))  # its lease ran out (a frozen worker)
        other = DatasetLock(client, LockSpec(NODE, DS[0], lease=30, wait=0)).acquire()  # someone else takes it
        with pytest.raises(LockLost):
            held[DS[0]].check()
        held[DS[1]].check()
    assert client.get(keys.dataset_lock(NODE, DS[0])) == other.value.encode()  # still the other holder's
    other.release()


def test_the_heartbeat_renews_every_lock_of_the_group(client: redis.Redis) -> None:
    with LockGroup(client, NODE, lease=0.6) as group:
        held = group.take(DS, wait=0)
        time.sleep(1.5)  # past two leases: only the renewal keeps them
        for lock in held.values():
            lock.check()
        assert all(client.pttl(keys.dataset_lock(NODE, ds)) > 0 for ds in DS)


def test_snapshot_takers_join_many_at_once_except_where_a_rollback_holds(client: redis.Redis) -> None:
    from hoster_tasks.locks import join_takers_many, leave_takers_many, wait_for_takers

    with DatasetLock(client, LockSpec(NODE, DS[2], lease=30, wait=0, kind="snapshot")):  # a rollback of DS[2]
        member, joined = join_takers_many(client, NODE, DS, lease=30)
    assert joined == [DS[0], DS[1], DS[3]]
    with pytest.raises(Busy):  # a rollback of a joined dataset waits for the job
        wait_for_takers(client, NODE, DS[0], wait=0.2)
    wait_for_takers(client, NODE, DS[2], wait=0.2)  # the one it did not join
    leave_takers_many(client, NODE, joined, member)
    for ds in DS:
        wait_for_takers(client, NODE, ds, wait=0.2)

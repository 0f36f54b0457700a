"""Per-dataset locks: one Redis key per (node, dataset) holding its holder's value, a lease renewed by a
heartbeat thread, and a fencing counter.

- One holder at a time: every change of the key is a compare-and-set on the holder's value (Lua), so a
  holder that lost its lease can neither renew nor release someone else's lock.
- A chain of tasks hands the lock from link to link: a link ends by swapping its value for a one-time
  handoff value, and the next link claims exactly that value. Two deliveries of one link cannot both
  claim it; a delivery that finds the lock held by its own chain is a duplicate (`DuplicateDelivery`).
- `check()` reads the key and the fence in one round trip and is called before every destructive ZFS
  command: a holder whose lease expired (a frozen worker, a Redis failover) stops there.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import redis

from hoster_tasks import keys
from hoster_tasks.errors import Busy, DuplicateDelivery, LockLost

# KEYS[1]: the lock. ARGV[1]: expected value; ARGV[2]: new value ('' deletes); ARGV[3]: lease in ms.
_SWAP = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('del', KEYS[1]) else redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3]) end
return 1
"""
_EXTEND = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class LockSpec:
    node: str
    dataset: str
    lease: float = 60.0
    wait: float = 30.0
    # "dataset": held by whatever sends, destroys or rolls back; "snapshot": held while snapshots are taken
    # and by a rollback (which also holds "dataset"), so a snapshot runs beside a replication, never inside
    # a rollback
    kind: str = "dataset"


def _nonce() -> str:
    return uuid.uuid4().hex


@dataclass
class DatasetLock:
    client: redis.Redis
    spec: LockSpec
    chain: str | None = None  # a chain of tasks sharing this lock: its links hand it on (see module doc)
    on_lost: Callable[[], None] | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    fence: int = 0
    value: str = ""  # what the key holds while the lock is ours

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.value = self._own_value()

    @property
    def key(self) -> str:
        return keys.lock_key(self.spec.kind, self.spec.node, self.spec.dataset)

    @property
    def _fence_key(self) -> str:
        return keys.lock_fence(self.spec.node, self.spec.dataset, self.spec.kind)

    def _own_value(self) -> str:
        return f"{self.chain}:{_nonce()}" if self.chain else _nonce()

    def _ms(self) -> int:
        return max(int(self.spec.lease * 1000), 1)

    def _swap(self, expected: str, new: str) -> bool:
        return bool(self.client.eval(_SWAP, 1, self.key, expected, new, self._ms()))

    # -- taking it ---------------------------------------------------------------------------------------
    def acquire(self) -> DatasetLock:
        """Take a free lock, waiting up to `spec.wait`; raises Busy (or DuplicateDelivery for a chain)."""
        deadline = time.monotonic() + self.spec.wait
        while not self.client.set(self.key, self.value, nx=True, px=self._ms()):
            holder = self._holder()
            if self.chain and holder is not None and holder.startswith(f"{self.chain}:"):
                raise DuplicateDelivery(f"{self.spec.dataset} on {self.spec.node} is held by another delivery "
                                        f"of the same chain ({self.chain})")
            if time.monotonic() >= deadline:
                raise Busy(f"dataset {self.spec.dataset} on {self.spec.node} is busy: another job holds its lock "
                           f"(holder {holder!r})", [self.spec.dataset])
            time.sleep(_POLL_SECONDS)
        return self._taken()

    def claim(self, handoff: str | None) -> DatasetLock:
        """A chain link takes the lock its previous link handed on; without a handoff (the first link, or
        a handoff that lapsed) it takes the lock like anyone else."""
        if handoff and self._swap(handoff, self.value):
            return self._taken()
        return self.acquire()

    def _taken(self) -> DatasetLock:
        pipe = self.client.pipeline()
        pipe.incr(self._fence_key)
        pipe.expire(self._fence_key, keys.FENCE_TTL_SECONDS)
        self.fence = int(pipe.execute()[0])
        self.lost.clear()
        self._start_heartbeat()
        return self

    def _holder(self) -> str | None:
        raw = self.client.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    # -- holding it --------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock:{self.spec.dataset}", daemon=True)
        self._thread.start()

    @property
    def renew_interval(self) -> float:
        return max(self.spec.lease / 3, 0.2)

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_interval):
            try:
                if self.client.eval(_EXTEND, 1, self.key, self.value, self._ms()):
                    continue
            except redis.RedisError:
                pass
            self._mark_lost()
            return

    def _mark_lost(self) -> None:
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost()

    def check(self) -> None:
        """Before anything destructive: the key still holds our value and nobody took the lock since
        (fence). Raises LockLost otherwise."""
        try:
            value, fence = self.client.mget([self.key, self._fence_key])
        except redis.RedisError as exc:
            self._mark_lost()
            raise LockLost(f"cannot verify the lock on {self.spec.dataset} ({self.spec.node}): {exc}") from None
        ours = isinstance(value, bytes) and value.decode() == self.value
        if self.lost.is_set() or not ours or fence is None or int(fence) != self.fence:
            self._mark_lost()
            raise LockLost(f"lost the lock on {self.spec.dataset} ({self.spec.node}); work stopped")

    # -- letting go --------------------------------------------------------------------------------------
    def hand_off(self) -> str:
        """End this link's hold by swapping our value for a one-time handoff value the next link claims
        (the lease carries the lock between the links). Returns that value."""
        self.stop_heartbeat()
        handoff = f"{self.chain}:handoff:{_nonce()}" if self.chain else f"handoff:{_nonce()}"
        if not self._swap(self.value, handoff):
            raise LockLost(f"lost the lock on {self.spec.dataset} ({self.spec.node}) before handing it on")
        return handoff

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        self.stop_heartbeat()
        try:
            self._swap(self.value, "")
        except redis.RedisError:
            pass  # the lease ends it

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()



# -- snapshot takers: shared among themselves, excluded by a rollback ----------------------------------------
# Snapshot jobs do not exclude each other (each takes its own snapshot), only a rollback (which destroys
# snapshots): they register in a sorted set scored by lease expiry (Redis' own clock), unless the rollback's
# exclusive key (the "snapshot" kind of DatasetLock) is held; a rollback holding that key waits until no
# live taker is left. Both checks run inside Redis, atomically: a taker and a rollback never miss each other.
_JOIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
_LIVE = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t[1] * 1000 + math.floor(t[2] / 1000))
return redis.call('ZCARD', KEYS[1])
"""


def join_takers(client: redis.Redis, node: str, dataset: str, lease: float) -> str | None:
    """Register a snapshot job on `dataset`; None while a rollback holds it."""
    member = _nonce()
    joined = client.eval(_JOIN, 2, keys.snapshot_lock(node, dataset), keys.snapshot_takers(node, dataset),
                         member, max(int(lease * 1000), 1))
    return member if joined else None


def leave_takers(client: redis.Redis, node: str, dataset: str, member: str) -> None:
    client.zrem(keys.snapshot_takers(node, dataset), member)


# join_takers for many datasets in one round trip: KEYS n snapshot locks, then their n taker sets.
_JOIN_MANY = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = #KEYS / 2
local out = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[i] = 0
  else
    redis.call('ZADD', KEYS[n + i], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('PEXPIRE', KEYS[n + i], ARGV[2])
    out[i] = 1
  end
end
return out
"""


def join_takers_many(client: redis.Redis, node: str, datasets: list[str], lease: float) -> tuple[str, list[str]]:
    """Register one snapshot job on each of `datasets` at once (as join_takers does for one), except where a
    rollback holds it. Returns the job's member and the datasets joined."""
    member = _nonce()
    if not datasets:
        return member, []
    joined = client.eval(_JOIN_MANY, 2 * len(datasets), *[keys.snapshot_lock(node, ds) for ds in datasets],
                         *[keys.snapshot_takers(node, ds) for ds in datasets], member, max(int(lease * 1000), 1))
    return member, [ds for ds, ok in zip(datasets, joined, strict=True) if int(ok)]  # type: ignore[arg-type]


def leave_takers_many(client: redis.Redis, node: str, datasets: list[str], member: str) -> None:
    pipe = client.pipeline(transaction=False)
    for ds in datasets:
        pipe.zrem(keys.snapshot_takers(node, ds), member)
    pipe.execute()


def wait_for_takers(client: redis.Redis, node: str, dataset: str, wait: float) -> None:
    """Under the rollback's exclusive key: wait until no snapshot job is taking a snapshot of `dataset`."""
    deadline = time.monotonic() + wait
    while client.eval(_LIVE, 1, keys.snapshot_takers(node, dataset)):
        if time.monotonic() >= deadline:
            raise Busy(f"{dataset} on {node}: a snapshot is being taken; retry", [dataset])
        time.sleep(_POLL_SECONDS)


# -- many locks at once: a snapshot job's prune over every VM of a node ---------------------------------------
# KEYS: n lock keys, then their n fence keys. ARGV[1]: lease ms; ARGV[2]: fence TTL s; ARGV[3..n+2]: our values.
# Each free lock is taken exactly as DatasetLock.acquire + _taken do (SET NX PX, then INCR its fence): the
# fence of each taken one is returned, 0 for one that is held.
_TAKE_MANY = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  if redis.call('set', KEYS[i], ARGV[i + 2], 'nx', 'px', ARGV[1]) then
    out[i] = redis.call('incr', KEYS[n + i])
    redis.call('expire', KEYS[n + i], ARGV[2])
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: lock keys; ARGV[1]: lease ms ('' releases); ARGV[2..]: our values. 1 where the key still held ours.
_RENEW_MANY = """
local out = {}
for i = 1, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[i + 1] then
    if ARGV[1] == '' then redis.call('del', KEYS[i]) else redis.call('pexpire', KEYS[i], ARGV[1]) end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class LockGroup:
    """Dataset locks taken, renewed and released together: one round trip each way and one heartbeat thread
    for all of them, instead of two round trips and a thread per dataset (hundreds of VMs per node). Each
    lock is a DatasetLock with its own value and fence: `check()` and losing it work exactly as for one
    taken alone, and a lock that could not be renewed is marked lost (its next check stops the work)."""

    def __init__(self, client: redis.Redis, node: str, lease: float, kind: str = "dataset") -> None:
        self.client = client
        self.node = node
        self.lease = lease
        self.kind = kind
        self.locks: dict[str, DatasetLock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ms(self) -> int:
        return max(int(self.lease * 1000), 1)

    def take(self, datasets: list[str], wait: float) -> dict[str, DatasetLock]:
        """Take whichever of `datasets` are free within `wait` (tried again every 0.1 s); the busy ones are
        left out. Returns every lock held by the group."""
        deadline = time.monotonic() + wait
        pending = [ds for ds in datasets if ds not in self.locks]
        while pending:
            fresh = [DatasetLock(self.client, LockSpec(self.node, ds, lease=self.lease, wait=0, kind=self.kind))
                     for ds in pending]
            fences = self.client.eval(_TAKE_MANY, 2 * len(fresh), *[lk.key for lk in fresh],
                                      *[lk._fence_key for lk in fresh], self._ms(), keys.FENCE_TTL_SECONDS,
                                      *[lk.value for lk in fresh])
            for lock, fence in zip(fresh, fences, strict=True):  # type: ignore[arg-type]
                if int(fence):
                    lock.fence = int(fence)
                    self.locks[lock.spec.dataset] = lock
            pending = [ds for ds in pending if ds not in self.locks]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
        if self.locks and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"locks:{self.node}", daemon=True)
            self._thread.start()
        return dict(self.locks)

    def _renew(self, release: bool = False) -> None:
        held = list(self.locks.values())
        if not held:
            return
        try:
            ok = self.client.eval(_RENEW_MANY, len(held), *[lk.key for lk in held], "" if release else self._ms(),
                                  *[lk.value for lk in held])
        except redis.RedisError:
            if release:
                return  # the lease ends them
            ok = [0] * len(held)
        for lock, kept in zip(held, ok, strict=True):  # type: ignore[arg-type]
            if not int(kept) and not release:
                lock._mark_lost()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.lease / 3, 0.2)):
            self._renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._renew(release=True)
        self.locks.clear()

    def __enter__(self) -> LockGroup:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

"""Per-dataset locks: redis-py `Lock` with an owner token, a lease renewed by a heartbeat thread, and a
fencing counter. A lease that cannot be renewed sets `lost` and calls `on_lost` so the work stops.

A chain of tasks passes one token along: the next link re-takes the lock it already owns (`reacquire`)
instead of queueing behind itself.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import redis
from redis.exceptions import LockError, LockNotOwnedError

from hoster_tasks import keys
from hoster_tasks.errors import Busy, LockLost


@dataclass(frozen=True)
class LockSpec:
    node: str
    dataset: str
    lease: float = 60.0
    wait: float = 30.0


@dataclass
class DatasetLock:
    client: redis.Redis
    spec: LockSpec
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_lost: Callable[[], None] | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    fence: int = 0

    def __post_init__(self) -> None:
        self._lock = self.client.lock(
            keys.dataset_lock(self.spec.node, self.spec.dataset),
            timeout=self.spec.lease,
            blocking_timeout=self.spec.wait,
            thread_local=False,  # the heartbeat thread renews what the task thread took
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return keys.dataset_lock(self.spec.node, self.spec.dataset)

    @property
    def value(self) -> str:
        """What the lock key holds while this lock is ours (a watchdog compares against it)."""
        return self.token

    def acquire(self) -> DatasetLock:
        if not self._retake():
            if not self._lock.acquire(token=self.token):
                holder = self.client.get(self.key)
                raise Busy(
                    f"dataset {self.spec.dataset} on {self.spec.node} is busy: another job holds its lock "
                    f"(holder {holder!r})",
                    [self.spec.dataset],
                )
        self.fence = int(self.client.incr(keys.lock_fence(self.spec.node, self.spec.dataset)))
        self._start_heartbeat()
        return self

    def _retake(self) -> bool:
        """True when the lock is already ours (an earlier link of the same chain)."""
        if self.client.get(self.key) != self.token.encode():
            return False
        self._lock.local.token = self.token.encode()
        try:
            self._lock.reacquire()
        except LockError:
            return False
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock:{self.spec.dataset}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(self.spec.lease / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                self._lock.extend(self.spec.lease, replace_ttl=True)
            except (LockNotOwnedError, LockError, redis.RedisError):
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return

    def check(self) -> None:
        """Call between steps: raises once the lease was lost, before anything destructive runs."""
        if self.lost.is_set() or not self._lock.owned():
            self.lost.set()
            raise LockLost(f"lost the lock on {self.spec.dataset} ({self.spec.node}); work stopped")

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        self.stop_heartbeat()
        try:
            self._lock.release()
        except (LockError, redis.RedisError):
            pass  # expired or taken over: nothing of ours to release

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def held_locks(client: redis.Redis) -> dict[str, float]:
    """Lock key -> seconds left on its lease (for `status`)."""
    out: dict[str, float] = {}
    for key in client.scan_iter(match=keys.LOCK_PATTERN, count=500):
        ttl = client.pttl(key)
        out[key.decode() if isinstance(key, bytes) else key] = max(ttl, 0) / 1000
    return out

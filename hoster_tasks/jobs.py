"""Running jobs, each with a lease: a job whose worker died is found, reported lost and re-queued once.

With early ack a message is gone from the broker once its job starts, so a worker killed mid-job would lose
the job silently. Each running job therefore has
- an entry in `hoster:running:<node>` (what it is, and the request that re-runs it), and
- a lease key `hoster:job-alive:<id>` that the worker process running it renews from a thread.

A job whose lease ran out while its entry remains is lost: its worker process died or froze. Whoever
notices first (every worker's heartbeat, a waiting CLI, `status`) removes the entry (HDEL: exactly one
wins), re-sends the job's request with a countdown that lets the dead job's dataset locks expire, marks
the lost id FAILURE, and leaves `hoster:job-requeued:<id>` so a waiting client follows the new job. A
re-run is safe: replication converges, and a snapshot job takes a fresh snapshot.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from hoster_tasks import keys
from hoster_tasks.errors import JobLost


@dataclass(frozen=True)
class Rerun:
    """The request that re-runs a job, and the id a client waiting for it waits on."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    follow: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LostJob:
    node: str
    task_id: str
    name: str
    requeued_as: str


# KEYS[1] the node's running-jobs hash, KEYS[2] the job's lease key; ARGV[1] task id, ARGV[2] this delivery's
# lease id, ARGV[3] the entry (JSON), ARGV[4] the lease in ms. A second delivery of a job whose first is
# alive is not tracked: its end must not untrack the first.
_START = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
# Ends this delivery's tracking only: its own entry and its own lease (a re-run may have replaced them).
_STOP = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw)['lease_id'] == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass
class JobLease:
    client: redis.Redis
    node: str
    task_id: str
    name: str
    args: list[Any]
    rerun: Rerun
    lease: float
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _ms(self) -> int:
        return int(self.lease * 1000)

    def start(self) -> bool:
        """Track this delivery; False when another delivery of the same job is alive (then nothing is)."""
        entry = {"name": self.name, "args": self.args, "started": time.time(), "rerun": asdict(self.rerun),
                 "lease": self.lease, "pid": os.getpid(), "lease_id": self.lease_id}
        alive = keys.job_alive(self.task_id)
        started = self.client.eval(_START, 2, keys.running_jobs(self.node), alive, self.task_id, self.lease_id,
                                   json.dumps(entry, default=str), self._ms())
        if started:
            threading.Thread(target=self._renew, name=f"job:{self.task_id}", daemon=True).start()
        return bool(started)

    def _renew(self) -> None:
        while not self._stop.wait(max(self.lease / 3, 0.2)):
            try:
                self.client.eval(_RENEW, 1, keys.job_alive(self.task_id), self.lease_id, self._ms())
            except redis.RedisError:
                continue  # the lease runs out if Redis stays away: the job is then treated as lost

    def stop(self) -> None:
        self._stop.set()
        self.client.eval(_STOP, 2, keys.running_jobs(self.node), keys.job_alive(self.task_id), self.task_id,
                         self.lease_id)


def _entries(client: redis.Redis, node: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(keys.running_jobs(node))
    return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]


def running_jobs(client: redis.Redis, node: str) -> list[dict[str, Any]]:
    """The jobs running on `node` now: those whose lease is alive (a lost one is not shown as running)."""
    entries = _entries(client, node)
    alive = client.mget([keys.job_alive(t) for t in entries]) if entries else []
    return [{"task_id": t, **e} for (t, e), a in zip(entries.items(), alive, strict=True) if a is not None]


def reap_lost_jobs(client: redis.Redis, app: Any, nodes: list[str]) -> list[LostJob]:
    """Re-queue every job of `nodes` whose lease ran out. Safe to run anywhere, any number of times."""
    lost = []
    for node in nodes:
        entries = _entries(client, node)
        alive = client.mget([keys.job_alive(t) for t in entries]) if entries else []
        for (task_id, entry), is_alive in zip(entries.items(), alive, strict=True):
            if is_alive is None and client.hdel(keys.running_jobs(node), task_id):  # one reaper wins
                lost.append(_requeue(client, app, node, task_id, entry))
    return lost


def _requeue(client: redis.Redis, app: Any, node: str, task_id: str, entry: dict[str, Any]) -> LostJob:
    rerun = Rerun(**entry["rerun"])
    # the dead job's locks were renewed as often as its lease: a third of a lease after it, they are free
    countdown = math.ceil(float(entry.get("lease", 60)) / 3) + 1
    new = app.send_task(rerun.name, args=rerun.args, kwargs=rerun.kwargs, queue=rerun.queue, countdown=countdown,
                        headers=rerun.headers)
    pipe = client.pipeline()
    for waited_on in {task_id, rerun.follow}:
        pipe.set(keys.job_requeued(waited_on), new.id, ex=keys.REQUEUED_TTL_SECONDS)
    pipe.execute()
    message = f"the worker running this job died; re-queued as {new.id}"
    app.backend.mark_as_failure(task_id, JobLost(message))
    return LostJob(node, task_id, entry.get("name", "?"), new.id)


def requeued_as(client: redis.Redis, task_id: str) -> str | None:
    raw = client.get(keys.job_requeued(task_id))
    return raw.decode() if isinstance(raw, bytes) else raw

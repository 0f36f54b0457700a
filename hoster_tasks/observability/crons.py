"""Sentry Crons for beat's fan-outs: a check-in closes with the outcome of the node jobs, not of the fan-out.

sentry-sdk (`CeleryIntegration(monitor_beat_tasks=True)`) sends IN_PROGRESS from beat and puts the monitor
slug, check-in id, monitor_config and start time into the message's `sentry-monitor-*` headers; its
task_success/task_failure handlers close the check-in when *that* task ends. A fan-out ends milliseconds
after it starts, so a schedule whose every node job fails would stay green. Instead:

1. `FanoutCheckin(task, client)` removes the `sentry-monitor-*` headers from the fan-out's own request, so
   sentry-sdk's handlers find none and send nothing (they read `request.headers` when the task ends);
2. `expect(nodes)` records the check-in in Redis with the set of nodes it waits for, before any job is
   sent (a fast job must find it), and gives the headers each node job carries (`FANOUT_HEADER`);
3. `job_finished(task, status, retval)`, called when a node job ends for good, takes its node out of the
   set atomically; the one that empties it closes the check-in: OK if no job failed, else ERROR.

A fan-out that fails itself (no live node, Redis gone mid-way) closes the check-in as ERROR at once.

A job lost with a dying worker never reports: the check-in then stays IN_PROGRESS and Sentry marks it timed
out at `max_runtime` (set per entry in sentry.py). That is the honest outcome, the run did not finish; the
record expires a little later (`RECORD_SLACK_SECONDS`). A job re-queued in its place must carry the same
`FANOUT_HEADER` (`fanout_headers`), and then counts as the lost one: the set holds nodes, not task ids.

What counts as a failed node job: FAILURE (after its last retry: RETRY never ends a job), or SUCCESS whose
result reports failures (`"failed"` non-empty). replicate_all raises Permanent when any VM failed, so today
that is a FAILURE; take_all fails as a whole (Busy after lock_wait_seconds, a zfs error).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis

from hoster_tasks import keys
from hoster_tasks.observability.sentry import cron_monitor_extra

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT
    from sentry_sdk._types import MonitorConfig

log = logging.getLogger(__name__)

FANOUT_HEADER = "hoster-fanout"  # message header of a node job: the id of the fan-out that sent it
_MONITOR_PREFIX = "sentry-monitor-"
RECORD_SLACK_SECONDS = 10 * 60  # the record outlives max_runtime by this much, then expires

# KEYS[1] the fan-out's record, KEYS[2] its pending set; ARGV[1] the node whose job ended, ARGV[2] "1" if it
# failed. Returns the record (HGETALL) to the caller that ended the last job, and deletes it; else nothing.
# SREM makes a second report for the same node (a duplicate delivery) a no-op.
_JOB_ENDED = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return false end
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'failures', 1) end
if redis.call('SCARD', KEYS[2]) > 0 then return false end
local record = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return record
"""


class NodeJob(Protocol):
    """What `job_finished` needs of a node task (NodeTask has all three)."""

    request: Any
    redis: redis.Redis
    settings: Any


@dataclass(frozen=True)
class CheckIn:
    """A beat check-in, as sentry-sdk announced it in the fan-out's headers."""

    slug: str
    check_in_id: str
    started: float  # epoch seconds at beat's dispatch (sentry-sdk's own start mark), else the fan-out's start
    monitor_config: dict[str, Any] = field(default_factory=dict)

    @property
    def max_runtime_seconds(self) -> int:
        minutes = self.monitor_config.get("max_runtime") or cron_monitor_extra(self.slug)["max_runtime"]
        return int(minutes) * 60

    def to_record(self) -> dict[FieldT, EncodableT]:
        return {"slug": self.slug, "check_in_id": self.check_in_id, "started": repr(self.started),
                "monitor_config": json.dumps(self.monitor_config), "failures": "0"}

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> CheckIn:
        return cls(record["slug"], record["check_in_id"], float(record["started"]),
                   json.loads(record.get("monitor_config") or "{}"))

    def close(self, ok: bool) -> None:
        from sentry_sdk.crons import MonitorStatus, capture_checkin

        capture_checkin(monitor_slug=self.slug, check_in_id=self.check_in_id,
                        status=MonitorStatus.OK if ok else MonitorStatus.ERROR,
                        duration=max(time.time() - self.started, 0.0),
                        monitor_config=cast("MonitorConfig", self.monitor_config) or None)


def _header_dicts(request: Any) -> list[dict[str, Any]]:
    """Every dict of the request where sentry-sdk may look for (or Celery may keep) message headers."""
    found = []
    for place in (getattr(request, "headers", None), getattr(request, "properties", None)):
        if isinstance(place, dict):
            found.append(place)
            if isinstance(place.get("headers"), dict):  # sentry-sdk flattens a nested "headers" too
                found.append(place["headers"])
    return found


def take_over(request: Any) -> CheckIn | None:
    """The beat check-in of this task's request, with its `sentry-monitor-*` headers removed so sentry-sdk
    does not close it when the task returns; None when beat did not monitor this run (no Sentry, or a
    fan-out sent by hand), and then nothing is removed."""
    merged: dict[str, Any] = {}
    for place in _header_dicts(request):
        merged.update(place)
    slug, check_in_id = merged.get("sentry-monitor-slug"), merged.get("sentry-monitor-check-in-id")
    if not slug or not check_in_id:
        return None
    for place in [*_header_dicts(request), vars(request)]:  # vars: Celery also sets each header as attribute
        for key in [k for k in place if isinstance(k, str) and k.startswith(_MONITOR_PREFIX)]:
            del place[key]
    started = merged.get("sentry-monitor-start-timestamp-s")
    config = merged.get("sentry-monitor-config")
    return CheckIn(str(slug), str(check_in_id), float(started) if started else time.time(),
                   dict(config) if isinstance(config, dict) else {})


class FanoutCheckin:
    """The check-in of one running fan-out, taken over from sentry-sdk. Use as a context manager around the
    fan-out's body: an exception closes the check-in as ERROR. Does nothing when the run is not monitored."""

    def __init__(self, task: Any, client: redis.Redis) -> None:
        self.fanout_id: str = task.request.id
        self.client = client
        self.checkin = take_over(task.request)
        self._recorded = False

    def __enter__(self) -> FanoutCheckin:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.fail()

    def expect(self, nodes: Iterable[str]) -> dict[str, str]:
        """Record the check-in and the nodes whose job it waits for; the headers each of those jobs carries.
        Call before sending any job. No node: the check-in closes as ERROR (nothing ran)."""
        nodes = list(nodes)
        if self.checkin is None:
            return {}
        if not nodes:
            self.fail()
            return {}
        ttl = self.checkin.max_runtime_seconds + RECORD_SLACK_SECONDS
        record, pending = keys.fanout_checkin(self.fanout_id), keys.fanout_pending(self.fanout_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping=self.checkin.to_record())
            pipe.sadd(pending, *nodes)
            pipe.expire(record, ttl)
            pipe.expire(pending, ttl)
            pipe.execute()
        self._recorded = True
        return fanout_headers(self.fanout_id)

    def fail(self) -> None:
        """Close the check-in as ERROR now (idempotent); jobs already sent then find no record."""
        if self.checkin is None:
            return
        if self._recorded:
            try:
                deleted = self.client.delete(keys.fanout_checkin(self.fanout_id), keys.fanout_pending(self.fanout_id))
            except redis.RedisError:
                deleted = 1  # cannot tell whether a job closed it: an extra ERROR beats a check-in left open
            if not deleted:
                return  # the last job has closed it already
        checkin, self.checkin = self.checkin, None
        checkin.close(ok=False)


def fanout_of(request: Any) -> str | None:
    """The id of the fan-out that sent this job, from its message headers (kept by Celery on retries)."""
    for place in _header_dicts(request):
        if place.get(FANOUT_HEADER):
            return str(place[FANOUT_HEADER])
    value = getattr(request, FANOUT_HEADER, None)
    return str(value) if value else None


def fanout_headers(fanout_id: str | None) -> dict[str, str]:
    """The headers a node job (or the job re-queued in place of a lost one) is sent with."""
    return {FANOUT_HEADER: fanout_id} if fanout_id else {}


def job_failed(status: str, retval: Any) -> bool:
    return status == "FAILURE" or (isinstance(retval, dict) and bool(retval.get("failed")))


def job_finished(task: NodeJob, status: str, retval: Any = None) -> None:
    """A node job ended (call from `after_return`). Only SUCCESS and FAILURE end a job; RETRY is ignored.
    The job that ends its fan-out's last pending job closes the check-in. Never raises: the job's own
    outcome must not depend on Crons bookkeeping."""
    if status not in ("SUCCESS", "FAILURE"):
        return
    fanout_id = fanout_of(task.request)
    if fanout_id is None:
        return
    try:
        record = task.redis.eval(_JOB_ENDED, 2, keys.fanout_checkin(fanout_id), keys.fanout_pending(fanout_id),
                                 task.settings.node_name, "1" if job_failed(status, retval) else "0")
        if not record:
            return  # other jobs still pending, or the record is gone (closed as ERROR, or expired)
        fields = _decode_pairs(record)
        CheckIn.from_record(fields).close(ok=int(fields.get("failures", "0")) == 0)
    except Exception:  # noqa: BLE001 (a broken check-in must not turn a finished job into a failed one)
        log.exception("could not report the end of fan-out %s to Sentry Crons", fanout_id)


def _decode_pairs(flat: list[Any]) -> dict[str, str]:
    """HGETALL as a Lua script returns it: [field, value, field, value, ...], bytes unless decoded."""
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    return dict(zip(text[::2], text[1::2], strict=True))

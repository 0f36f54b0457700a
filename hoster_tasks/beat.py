"""Beat that can run on two hosts: celery-redbeat's scheduler, with the schedule slot passed on.

- One beat fires. RedBeat keeps the schedule in Redis and a lock (`beat_lock_key`): the beat holding it
  extends it on every tick, before it fires anything; a second beat blocks at start until the lock is free
  (its holder stopped, or died and the lock's `beat_lock_timeout_seconds` ran out), then takes over with
  the entries' `last_run_at` as the other left them. A beat that finds its lock gone (taken over while it
  could not reach Redis, or lost in a Sentinel failover) fires nothing and waits for the lock again.
- The schedule is `beat_schedule.build_beat_schedule(settings)`: RedBeat re-syncs it at every start, and
  an entry removed from the settings is deleted from Redis (its `statics` set remembers what was there).
- Each snapshot fan-out carries its slot (the cron tick it is for, unix seconds): the node names the
  snapshot after it, so two fan-outs of one slot take one snapshot (snapshots.take).
- A slot no beat fired (every beat was down at its tick; crontab then fires the entry once, late) is logged
  and counted in `hoster:beat-missed` (entry -> count) when the entry next fires.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import redis
from celery.schedules import crontab
from redbeat.schedulers import RedBeatScheduler, RetryingConnection

from hoster_tasks import keys
from hoster_tasks.redis_conn import redis_client
from hoster_tasks.settings import get_settings

log = logging.getLogger("hoster_tasks.beat")

SLOT_TASKS = frozenset({"hoster.snapshot.fanout"})  # fan-outs whose node jobs de-duplicate by slot
MAX_TICKS = 100_000  # ticks walked to count missed slots (69 days of an every-minute entry)
MISSED_LISTED = 5  # missed slots named in one log line


# -- slots -----------------------------------------------------------------------------------------------
def next_tick(schedule: crontab, after: datetime) -> datetime:
    """The first tick of `schedule` strictly after `after` (UTC)."""
    start, delta, _ = schedule.remaining_delta(after)
    return (start + delta).astimezone(UTC)  # type: ignore[no-any-return]


def due_ticks(schedule: crontab, last_run_at: datetime, now: datetime) -> list[datetime]:
    """The ticks after `last_run_at` up to `now`: the last one is the slot being fired, the others were
    missed. Never empty: an entry judged due is for at least its next tick (even with a clock a hair off)."""
    ticks = [next_tick(schedule, last_run_at)]
    while len(ticks) < MAX_TICKS:
        following = next_tick(schedule, ticks[-1])
        if following > now:
            break
        ticks.append(following)
    return ticks


def slot_of(schedule: Any, last_run_at: datetime | None, now: datetime) -> tuple[int, list[datetime]]:
    """(the slot to fire, in unix seconds; the missed ticks before it). Not a crontab, or never run:
    the current minute, nothing missed."""
    if not isinstance(schedule, crontab) or last_run_at is None:
        return int(now.replace(second=0, microsecond=0).timestamp()), []
    ticks = due_ticks(schedule, last_run_at.astimezone(UTC), now)
    return int(ticks[-1].timestamp()), ticks[:-1]


def record_missed(client: redis.Redis, entry: str, missed: list[datetime]) -> None:
    listed = ", ".join(t.strftime("%Y-%m-%dT%H:%M") for t in missed[:MISSED_LISTED])
    more = f" and {len(missed) - MISSED_LISTED} more" if len(missed) > MISSED_LISTED else ""
    log.warning("beat: %s missed %d slot(s): %s%s (no beat ran at those ticks; firing the current one once)",
                entry, len(missed), listed, more)
    client.hincrby(keys.BEAT_MISSED, entry, len(missed))


# -- the scheduler ---------------------------------------------------------------------------------------
class HosterScheduler(RedBeatScheduler):  # type: ignore[misc]
    """RedBeat on our Redis client (Sentinel too), with slots and missed-slot counting."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        # RedBeat builds its own client from redbeat_redis_url; ours understands sentinel:// the same way as
        # every other part, so RedBeat gets that one (RetryingConnection rides out a failover).
        client = redis_client(settings, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        app.redbeat_redis = RetryingConnection(settings.beat_redis_retry_seconds, client)
        self._client = client
        super().__init__(app, *args, **kwargs)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if advance:  # a due entry, fired by the tick (not a re-send)
            slot, missed = slot_of(entry.schedule, entry.last_run_at, datetime.now(UTC))
            if missed:
                record_missed(self._client, entry.name, missed)
            if entry.task in SLOT_TASKS:
                entry.kwargs = {**(entry.kwargs or {}), "slot": slot}
        # keywords: sentry-sdk wraps RedBeat's apply_async and unpacks exactly (scheduler, entry) positionally
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            return float(super().tick(*args, **kwargs))
        except redis.exceptions.LockNotOwnedError:
            # Another beat holds the lock now (ours lapsed while Redis was out of reach, or a failover lost
            # it): fire nothing until it is ours again.
            log.warning("beat: lost the beat lock %s; waiting for it as a standby", self.lock_key)
            self.lock.acquire()
            log.info("beat: acquired the beat lock again")
            return 0.0
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # The lock is extended before anything fires, so nothing fired in this tick: try again shortly.
            log.warning("beat: Redis unreachable (%s); retrying", exc)
            return min(float(self.max_interval), 1.0)

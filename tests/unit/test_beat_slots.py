"""Beat slots (hoster_tasks/beat.py): which cron tick a due entry fires for, and which ticks it missed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from celery.schedules import crontab

from hoster_tasks.beat import slot_of


def at(h: int, m: int, s: int = 0, us: int = 0) -> datetime:
    return datetime(2024, 3, 1, h, m, s, us, tzinfo=UTC)


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def test_an_entry_fired_on_time_is_for_the_tick_just_passed_and_missed_nothing() -> None:
    slot, missed = slot_of(crontab(), at(12, 0, 0, 300_000), at(12, 1, 0, 50_000))
    assert (slot, missed) == (ts(at(12, 1)), [])


def test_a_late_fire_is_for_the_latest_tick_and_names_the_ticks_no_beat_fired() -> None:
    slot, missed = slot_of(crontab(), at(12, 0, 0, 300_000), at(12, 5, 10))
    assert slot == ts(at(12, 5))
    assert missed == [at(12, 1), at(12, 2), at(12, 3), at(12, 4)]


def test_hourly_entry_down_for_three_hours() -> None:
    slot, missed = slot_of(crontab(minute="33"), at(12, 33, 1), at(15, 40))
    assert slot == ts(at(15, 33))
    assert missed == [at(13, 33), at(14, 33)]


def test_a_beat_a_hair_early_still_fires_the_next_tick_not_the_last_one() -> None:
    slot, missed = slot_of(crontab(), at(12, 0, 0, 300_000), at(12, 0, 59, 999_000))
    assert (slot, missed) == (ts(at(12, 1)), [])


@pytest.mark.parametrize("schedule", [crontab(), 60.0])
def test_never_run_or_not_a_crontab_is_the_current_minute(schedule: object) -> None:
    slot, missed = slot_of(schedule, None if isinstance(schedule, crontab) else at(11, 0), at(12, 7, 42))
    assert (slot, missed) == (ts(at(12, 7)), [])

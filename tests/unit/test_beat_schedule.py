"""The default beat schedule: Hoster's cron lines, in UTC (beat_schedule.py)."""

from __future__ import annotations

import json

import pytest
from celery.schedules import crontab

from beat_schedule import build_beat_schedule
from hoster_tasks import keys
from hoster_tasks.observability.errorfile import error_name
from hoster_tasks.settings import Settings

ALL_DAYS = set(range(7))
ALL_HOURS = set(range(24))
ALL_DOM = set(range(1, 32))
ALL_MONTHS = set(range(1, 13))
TARGET = {"name": "hoster01", "host": "10.5.199.85"}


pytestmark = pytest.mark.usefixtures("clean_env")


def fields(c: crontab) -> tuple[set[int], set[int], set[int], set[int], set[int]]:
    """(minute, hour, day_of_month, month_of_year, day_of_week) as sets."""
    return c.minute, c.hour, c.day_of_month, c.month_of_year, c.day_of_week


def test_default_snapshot_entries() -> None:
    schedule = build_beat_schedule(Settings.from_env())
    assert sorted(schedule) == ["snapshot-daily", "snapshot-hourly", "snapshot-monthly", "snapshot-weekly"]

    hourly, daily = schedule["snapshot-hourly"], schedule["snapshot-daily"]
    weekly, monthly = schedule["snapshot-weekly"], schedule["snapshot-monthly"]

    assert fields(hourly["schedule"]) == ({33}, ALL_HOURS, ALL_DOM, ALL_MONTHS, ALL_DAYS)
    assert hourly["args"] == ["hourly", 3]
    assert fields(daily["schedule"]) == ({5}, {4}, ALL_DOM, ALL_MONTHS, ALL_DAYS)
    assert daily["args"] == ["daily", 5]
    assert fields(weekly["schedule"]) == ({5}, {5}, ALL_DOM, ALL_MONTHS, {3})  # Wednesday
    assert weekly["args"] == ["weekly", 3]
    assert fields(monthly["schedule"]) == ({5}, {3}, {15}, ALL_MONTHS, ALL_DAYS)
    assert monthly["args"] == ["monthly", 6]

    for entry in schedule.values():
        assert entry["task"] == "hoster.snapshot.fanout"
        assert entry["options"] == {"queue": "hoster.control"}
        assert entry["options"]["queue"] == keys.CONTROL_QUEUE


def test_no_replication_without_targets() -> None:
    schedule = build_beat_schedule(Settings.from_env())
    assert not any(e["task"] == "hoster.replication.fanout" for e in schedule.values())


def test_default_replication_per_target_at_minute_50(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET, {"name": "offsite01", "host": "offsite.example"}]))
    schedule = build_beat_schedule(Settings.from_env())
    rep = schedule["replicate-hoster01"]
    assert rep["task"] == "hoster.replication.fanout"
    assert fields(rep["schedule"]) == ({50}, ALL_HOURS, ALL_DOM, ALL_MONTHS, ALL_DAYS)
    assert rep["args"] == ["hoster01"]
    assert rep["kwargs"] == {"speed_limit": None, "script_name": None}
    assert rep["options"] == {"queue": "hoster.control"}
    # no script name: the job's alert file is the seed's ERROR_to_<endpoint>
    assert error_name(Settings.from_env().endpoint("hoster01").name, None) == "to_hoster01"
    assert schedule["replicate-offsite01"]["args"] == ["offsite01"]
    assert len(schedule) == 6


def test_snapshot_schedule_override_replaces_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "HOSTER_SNAPSHOT_SCHEDULE",
        json.dumps(
            {
                "hourly": {"cron": "0 */2 * * *", "stype": "hourly", "keep": 12},
                "yearly": {"cron": "0 2 1 1 *", "stype": "yearly", "keep": 2},
            }
        ),
    )
    schedule = build_beat_schedule(Settings.from_env())
    assert sorted(schedule) == ["snapshot-hourly", "snapshot-yearly"]
    assert fields(schedule["snapshot-hourly"]["schedule"]) == (
        {0}, set(range(0, 24, 2)), ALL_DOM, ALL_MONTHS, ALL_DAYS,
    )
    assert schedule["snapshot-hourly"]["args"] == ["hourly", 12]
    assert fields(schedule["snapshot-yearly"]["schedule"]) == ({0}, {2}, {1}, {1}, ALL_DAYS)
    assert schedule["snapshot-yearly"]["args"] == ["yearly", 2]


def test_replication_schedule_override_replaces_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET]))
    monkeypatch.setenv(
        "HOSTER_REPLICATION_SCHEDULE",
        json.dumps(
            {
                "to_hoster01": {
                    "cron": "15 1,13 * * 1-5",
                    "endpoint": "hoster01",
                    "speed_limit": 90,
                    "script_name": "to_hoster01",
                },
                "nightly": {"cron": "0 3 * * *", "endpoint": "10.5.199.85"},
            }
        ),
    )
    schedule = build_beat_schedule(Settings.from_env())
    assert "replicate-hoster01" not in schedule
    rep = schedule["replicate-to_hoster01"]
    assert fields(rep["schedule"]) == ({15}, {1, 13}, ALL_DOM, ALL_MONTHS, {1, 2, 3, 4, 5})
    assert rep["args"] == ["hoster01"]
    assert rep["kwargs"] == {"speed_limit": 90.0, "script_name": "to_hoster01"}
    nightly = schedule["replicate-nightly"]
    assert nightly["args"] == ["10.5.199.85"]
    assert nightly["kwargs"] == {"speed_limit": None, "script_name": None}  # ERROR_to_hoster01, host or not
    assert fields(nightly["schedule"]) == ({0}, {3}, ALL_DOM, ALL_MONTHS, ALL_DAYS)


def test_schedule_is_json_serialisable_apart_from_crontab() -> None:
    """Beat sends args/kwargs/options as JSON messages: only plain values there."""
    schedule = build_beat_schedule(Settings.from_env(targets=[TARGET]))
    for entry in schedule.values():
        json.dumps({k: v for k, v in entry.items() if k != "schedule"})
        assert isinstance(entry["schedule"], crontab)

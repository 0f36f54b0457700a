"""The default beat schedule: Hoster's cron lines (../shared/seed/backups-overview.md), in UTC.

    33 * *  * *   snapshot all --stype hourly  --keep 3
    5  4 *  * *   snapshot all --stype daily   --keep 5
    5  5 *  * 3   snapshot all --stype weekly  --keep 3
    5  3 15 * *   snapshot all --stype monthly --keep 6
    50 * *  * *   vm replicate-all --endpoint E   (default: one per configured target)

Override without editing code: `snapshot_schedule` and `replication_schedule` in settings (HOSTER_* or the
TOML file). `yearly` is available as a type: add an entry for it.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from hoster_tasks import keys
from hoster_tasks.settings import ReplicationEntry, Settings


def _crontab(expr: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = expr.split()
    return crontab(minute, hour, day_of_week, day_of_month, month_of_year)


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    schedule: dict[str, dict[str, Any]] = {}
    for name, entry in settings.snapshot_schedule.items():
        schedule[f"snapshot-{name}"] = {
            "task": "hoster.snapshot.fanout",
            "schedule": _crontab(entry.cron),
            "args": [entry.stype, entry.keep],
            "options": {"queue": keys.CONTROL_QUEUE},
        }
    replications = settings.replication_schedule or {
        t.name: ReplicationEntry(cron="50 * * * *", endpoint=t.name) for t in settings.targets
    }
    for name, rep in replications.items():
        schedule[f"replicate-{name}"] = {
            "task": "hoster.replication.fanout",
            "schedule": _crontab(rep.cron),
            "args": [rep.endpoint],
            # no script name: the job writes ERROR_to_<endpoint name>, as the seed's scripts name theirs
            "kwargs": {"speed_limit": rep.speed_limit, "script_name": rep.script_name},
            "options": {"queue": keys.CONTROL_QUEUE},
        }
    return schedule

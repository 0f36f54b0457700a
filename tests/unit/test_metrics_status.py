"""Pure parts of hoster_tasks/observability: metric values and exposition, status rendering, error summaries,
and what the Sentry hook does to events and Crons check-ins (no Redis, no Sentry)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hoster_tasks.observability.metrics import HELP, _line, format_value, render_metrics
from hoster_tasks.observability.sentry import (
    CRON_CHECKIN_MARGIN_MINUTES,
    SCRUBBED,
    cron_monitor_extra,
    make_before_send,
    scrub,
    secret_values,
)
from hoster_tasks.observability.status import _age, error_summary, render_status
from hoster_tasks.settings import Settings

# -- metrics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (0, "0"),
        (1, "1"),
        (1171456, "1171456"),  # %g wrote 1.17146e+06
        (1795738611.0327096, "1795738611.0327096"),  # %g wrote 1.79574e+09: 500 s off
        (8.508510657, "8.508510657"),
        (0.5, "0.5"),
        (-3.0, "-3"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
        (2.0**60, repr(2.0**60)),
    ],
)
def test_metric_values_are_exact(value: float, text: str) -> None:
    assert format_value(value) == text
    if not math.isnan(value):
        assert float(text.replace("Inf", "inf")) == value


def test_exposition_parses_with_awkward_labels_and_exact_values() -> None:
    dataset = 'zroot/vm "odd"\\name\nx'
    by_name: dict[str, list[str]] = {name: [] for name in HELP}
    by_name["hoster_tasks_replication_bytes_total"].append(
        _line("hoster_tasks_replication_bytes_total", {"node": "n1", "dataset": dataset, "target": "t"}, 1171456)
    )
    by_name["hoster_tasks_last_snapshot_timestamp_seconds"].append(
        _line("hoster_tasks_last_snapshot_timestamp_seconds", {"node": "n1", "dataset": dataset}, 1795738611.25)
    )
    text = render_metrics(by_name)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["hoster_tasks_replication_bytes"].type == "counter"
    (sample,) = families["hoster_tasks_replication_bytes"].samples
    assert sample.name == "hoster_tasks_replication_bytes_total"
    assert sample.labels == {"node": "n1", "dataset": dataset, "target": "t"} and sample.value == 1171456
    (ts,) = families["hoster_tasks_last_snapshot_timestamp_seconds"].samples
    assert ts.value == 1795738611.25
    assert text.count("# HELP ") == len(HELP) and text.count("# TYPE ") == len(HELP)


# -- status ---------------------------------------------------------------------------------------------------

SSH_ERROR = (
    "[broken] ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=3 -p 22 -l root "
    "-i /etc/hoster-tasks/id_ed25519 -- 10.0.0.3 zfs receive -u tank/missing/vm/vm1 exited 1: "
    "cannot open 'tank/missing/vm/vm1': dataset does not exist\n"
    "cannot receive new filesystem stream: dataset does not exist [stages: zfs=0; pv=0; ssh=1]"
)


@pytest.mark.parametrize(
    "text, summary",
    [
        (None, ""),
        ("", ""),
        (SSH_ERROR, "cannot open 'tank/missing/vm/vm1': dataset does not exist"),
        ("[local] zfs send a@b exited 1: out of space [stages: zfs=1; pv=0; ssh=0]", "out of space"),
        ("src:tank/vm/a -> dst:tank/vm/a diverged: the target has snapshots the source never had",
         "src:tank/vm/a -> dst:tank/vm/a diverged: the target has sna…"),
        ("dataset tank/vm/a on n1 is busy", "dataset tank/vm/a on n1 is busy"),
    ],
)
def test_error_summary_shows_what_failed_not_the_argv(text: str | None, summary: str) -> None:
    assert error_summary(text) == summary
    assert len(error_summary(text)) <= 60


@pytest.mark.parametrize(
    "ts, text",
    [(None, "never"), (1000.0, "0m00s ago"), (941.0, "0m59s ago"), (880.0, "2m00s ago"), (1000 - 3725, "1h02m ago"),
     (1030.0, "0m00s ago")],  # a clock ahead of ours is "now", not "-1m30s ago"
)
def test_age(ts: float | None, text: str) -> None:
    assert _age(None if ts is None else str(ts), 1000.0) == text


def test_status_table_rows() -> None:
    now = 1_800_000_000.0
    status = {
        "now": now,
        "nodes": [{"node": "n1", "up": True, "last_seen": now - 3}, {"node": "n2", "up": False, "last_seen": None}],
        "vms": [
            {"node": "n1", "vm": "web", "dataset": "tank/vm/web", "parent": "n1", "last_snapshot": "tank/vm/web@x",
             "last_snapshot_time": str(now - 120),
             "replication": {
                 "dst": {"last_success": str(now - 60), "target_newest_creation": str(now - 125), "error": "0"},
                 "broken": {"error": "1", "last_error": SSH_ERROR, "failures": "2"},
             }},
            {"node": "n1", "vm": "db", "dataset": "tank/vm/db", "parent": "n2", "last_snapshot": None,
             "last_snapshot_time": None, "replication": {}},
        ],
        "running": [{"node": "n1", "task_id": "t1", "name": "hoster.replication.step", "args": [None, "tank/vm/web"],
                     "started": now - 30}],
        "locks": {"hoster:lock:n1:tank/vm/web": 9.6},
    }
    text = render_status(status)
    lines = text.splitlines()
    assert "Hoster Nodes" in text and "Hoster VMs" in text and "Running Jobs" in text and "Held Locks" in text
    n2 = next(line for line in lines if "│ n2 " in line)
    assert "NO" in n2 and "never" in n2
    dst = next(line for line in lines if "│ dst " in line)
    assert "2m00s ago" in dst and "1m00s ago" in dst and "2m05s ago" in dst  # snapshot, replication, lag
    broken = next(line for line in lines if "│ broken " in line)
    assert "never" in broken and "dataset does not exist" in broken and "ssh" not in broken
    db = next(line for line in lines if "db (copy of n2)" in line)
    assert "never" in db
    assert any("hoster.replication.step" in line and "0m30s ago" in line for line in lines)
    assert any("tank/vm/web" in line and "10s" in line for line in lines[lines.index(next(
        line for line in lines if "Held Locks" in line)):])
    for box in text.split("\n╭")[1:]:  # every box is rectangular, with long error text cut to fit
        assert len({len(line) for line in ("╭" + box).splitlines()}) == 1, box


# -- Sentry hook ---------------------------------------------------------------------------------------------

def _settings(**kw: object) -> Settings:
    base: dict[str, object] = {
        "redis_url": "rediss://hoster:Sup3r-Secret@redis.example.net:6380/0",
        "sentry_dsn": "https://0123456789abcdef0123456789abcdef@sentry.example.net/7",
        "node_name": "n1",
        "targets": [{"name": "hoster02", "host": "10.0.0.2", "key_file": "/etc/hoster-tasks/keys/id_hoster02"}],
    }
    base.update(kw)
    return Settings.from_env(**base)


def test_secret_values_found_in_settings() -> None:
    found = secret_values(_settings())
    assert found["Sup3r-Secret"] == SCRUBBED
    assert found["0123456789abcdef0123456789abcdef"] == SCRUBBED
    assert found["/etc/hoster-tasks/keys/id_hoster02"] == "[key_file]"
    assert secret_values(_settings(redis_url="redis://127.0.0.1:6379/0", sentry_dsn=None, targets=[])) == {}


def test_events_lose_every_secret_but_keep_the_story() -> None:
    settings = _settings()
    before_send = make_before_send(settings)
    argv = ["ssh", "-i", "/etc/hoster-tasks/keys/id_hoster02", "--", "10.0.0.2", "zfs receive -u tank/vm/a"]
    event = {
        "exception": {"values": [{"type": "DatasetNotFound",
                                  "value": f"[hoster02] {' '.join(argv)} exited 1: cannot open 'tank/vm/a'"}]},
        "contexts": {"hoster_tasks": {"dataset": "tank/vm/a", "stderr": "cannot open 'tank/vm/a'", "argv": argv,
                                      "settings": {"redis_url": settings.redis_url, "lock_lease_seconds": 60}}},
        "breadcrumbs": {"values": [{"message": "connecting to redis://u:other-pw@10.1.1.1:6379/1"},
                                   {"message": " ".join(argv)}]},
        "extra": {"password": "hunter2", "key_file": "/x", "Token": "abc", "nothing": None},
        "tags": {"node": "n1", "target": "hoster02"},
    }
    out = before_send(json.loads(json.dumps(event)), {})
    raw = json.dumps(out)
    for secret in ("Sup3r-Secret", "id_hoster02", "other-pw", "hunter2", "0123456789abcdef0123456789abcdef"):
        assert secret not in raw, secret
    assert out["contexts"]["hoster_tasks"]["argv"][2] == "[key_file]"
    assert out["contexts"]["hoster_tasks"]["settings"]["redis_url"] == SCRUBBED
    assert out["contexts"]["hoster_tasks"]["settings"]["lock_lease_seconds"] == 60
    assert out["breadcrumbs"]["values"][0]["message"] == f"connecting to redis://u:{SCRUBBED}@10.1.1.1:6379/1"
    assert out["extra"] == {"password": SCRUBBED, "key_file": SCRUBBED, "Token": SCRUBBED, "nothing": None}
    assert "cannot open 'tank/vm/a'" in out["exception"]["values"][0]["value"]
    assert out["tags"] == {"node": "n1", "target": "hoster02"}


def test_scrub_leaves_ordinary_text_alone() -> None:
    secrets = {"pw": SCRUBBED}  # a short secret would mangle words: secret_values never yields one from a DSN key
    assert scrub({"a": ["http://example.net/x", 3, None, True]}, {}) == {"a": ["http://example.net/x", 3, None, True]}
    assert scrub("pw", secrets) == SCRUBBED


def test_check_ins_get_max_runtime_by_entry() -> None:
    before_send = make_before_send(_settings())
    for slug, minutes in (("replicate-hoster02", 24 * 60), ("snapshot-hourly", 2 * 60), ("other", 24 * 60)):
        check_in = {"type": "check_in", "monitor_slug": slug, "status": "in_progress",
                    "monitor_config": {"schedule": {"type": "crontab", "value": "50 * * * *"}, "timezone": "UTC"}}
        out = before_send(check_in, {})
        assert out["monitor_config"]["max_runtime"] == minutes == cron_monitor_extra(slug)["max_runtime"]
        assert out["monitor_config"]["checkin_margin"] == CRON_CHECKIN_MARGIN_MINUTES
        assert out["monitor_config"]["schedule"] == {"type": "crontab", "value": "50 * * * *"}
    # a monitor_config that already says it is kept; a check-in without one gets none invented
    kept = before_send({"type": "check_in", "monitor_slug": "replicate-x", "monitor_config": {"max_runtime": 5}}, {})
    assert kept["monitor_config"]["max_runtime"] == 5
    assert "monitor_config" not in before_send({"type": "check_in", "monitor_slug": "x", "status": "ok"}, {})


def test_key_file_path_types() -> None:
    # key_file is a Path in Settings; the scrubber matches its text form
    assert str(Path("/etc/hoster-tasks/keys/id_hoster02")) in secret_values(_settings())


# -- Flower ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["ops:pw", "ops:p:w", "a:1,b:2"])
def test_flower_auth_accepted(auth: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoster_tasks.observability.flower import flower_argv, flower_env

    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    assert flower_env(auth)["FLOWER_BASIC_AUTH"] == auth
    assert not any(auth in arg for arg in flower_argv("127.0.0.1", 5555))  # never on a command line


@pytest.mark.parametrize("auth", [None, "", "ops", "ops:", ":pw", "ops:pa,ss", "a:1,", "a:1,,b:2"])
def test_flower_auth_refused(auth: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoster_tasks.errors import ConfigError
    from hoster_tasks.observability.flower import flower_env

    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    with pytest.raises(ConfigError):
        flower_env(auth)


def test_flower_auth_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hoster_tasks.observability.flower import flower_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:from-env")
    assert flower_env(None)["FLOWER_BASIC_AUTH"] == "ops:from-env"

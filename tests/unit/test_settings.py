"""Typed settings from HOSTER_* and the TOML file named by HOSTER_CONFIG (hoster_tasks/settings.py).

`get_settings()` is cached for the process: these tests build `Settings.from_env()` directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hoster_tasks.errors import ConfigError
from hoster_tasks.settings import DEFAULT_SNAPSHOT_SCHEDULE, Endpoint, ScheduleEntry, Settings

TARGET = {
    "name": "hoster01",
    "host": "10.5.199.85",
    "key_file": "/etc/hoster-tasks/ssh/id_ed25519",
    "known_hosts": "/etc/hoster-tasks/ssh/known_hosts",
    "root_map": {"zroot/vm-encrypted": "backup/vm-encrypted"},
}


pytestmark = pytest.mark.usefixtures("clean_env")


def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("HOSTER_CONFIG", str(path))
    return path


def test_defaults() -> None:
    s = Settings.from_env()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.node_name == "node-a"
    assert s.datasets == ["zroot/vm-encrypted"]
    assert s.zfs_command == "zfs"
    assert s.targets == []
    assert s.snapshot_schedule == DEFAULT_SNAPSHOT_SCHEDULE
    assert s.replication_schedule == {}
    assert s.metrics_textfile is None
    assert s.error_dir == Path("/var/run/replication")


def test_default_node_name_is_short_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTER_NODE_NAME")
    monkeypatch.setattr("socket.gethostname", lambda: "hoster02.example.net")
    assert Settings.from_env().node_name == "hoster02"


def test_env_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_REDIS_URL", "redis://:pw@redis.example.net:6380/2")
    monkeypatch.setenv("HOSTER_NODE_NAME", "hoster02")
    monkeypatch.setenv("HOSTER_LOCK_LEASE_SECONDS", "90")
    monkeypatch.setenv("HOSTER_RETRY_MAX", "7")
    monkeypatch.setenv("HOSTER_ZFS_COMMAND", "/sbin/zfs")
    monkeypatch.setenv("HOSTER_METRICS_TEXTFILE", "/var/lib/node_exporter/textfile/h.prom")
    s = Settings.from_env()
    assert s.redis_url == "redis://:pw@redis.example.net:6380/2"
    assert s.node_name == "hoster02"
    assert s.lock_lease_seconds == 90.0
    assert s.retry_max == 7
    assert s.zfs_command == "/sbin/zfs"
    assert s.metrics_textfile == Path("/var/lib/node_exporter/textfile/h.prom")


def test_env_json_lists_and_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_DATASETS", json.dumps(["zroot/vm-encrypted", "zroot/vm-unencrypted"]))
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET]))
    monkeypatch.setenv(
        "HOSTER_SNAPSHOT_SCHEDULE", json.dumps({"yearly": {"cron": "0 2 1 1 *", "stype": "yearly", "keep": 2}})
    )
    monkeypatch.setenv(
        "HOSTER_REPLICATION_SCHEDULE",
        json.dumps({"to_hoster01": {"cron": "50 * * * *", "endpoint": "hoster01", "speed_limit": 90}}),
    )
    s = Settings.from_env()
    assert s.datasets == ["zroot/vm-encrypted", "zroot/vm-unencrypted"]
    assert s.targets == [
        Endpoint(
            name="hoster01",
            host="10.5.199.85",
            key_file=Path("/etc/hoster-tasks/ssh/id_ed25519"),
            known_hosts=Path("/etc/hoster-tasks/ssh/known_hosts"),
            root_map={"zroot/vm-encrypted": "backup/vm-encrypted"},
        )
    ]
    assert s.snapshot_schedule == {"yearly": ScheduleEntry(cron="0 2 1 1 *", stype="yearly", keep=2)}
    assert s.replication_schedule["to_hoster01"].speed_limit == 90.0


def test_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        monkeypatch,
        """
datasets = ["zroot/vm-encrypted", "tank/vms"]
lock_lease_seconds = 45
error_dir = "/tmp/replication"

[[targets]]
name = "hoster01"
host = "10.5.199.85"
port = 2222
root_map = { "zroot/vm-encrypted" = "backup/vm-encrypted" }
keep = { hourly = 24, daily = 14 }

[snapshot_schedule.hourly]
cron = "0 * * * *"
stype = "hourly"
keep = 12
""",
    )
    s = Settings.from_env()
    assert s.datasets == ["zroot/vm-encrypted", "tank/vms"]
    assert s.lock_lease_seconds == 45.0
    assert s.error_dir == Path("/tmp/replication")
    (target,) = s.targets
    assert (target.name, target.host, target.port, target.user) == ("hoster01", "10.5.199.85", 2222, "root")
    assert target.keep == {"hourly": 24, "daily": 14}
    # a table in the file replaces all the default entries
    assert s.snapshot_schedule == {"hourly": ScheduleEntry(cron="0 * * * *", stype="hourly", keep=12)}


def test_sample_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = Path(__file__).resolve().parents[2] / "ops" / "config.sample.toml"
    monkeypatch.setenv("HOSTER_CONFIG", str(sample))
    s = Settings.from_env()
    assert [t.name for t in s.targets] == ["hoster01"]
    assert s.replication_schedule["to_hoster01"].endpoint == "hoster01"
    assert s.snapshot_schedule == DEFAULT_SNAPSHOT_SCHEDULE


def test_env_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        monkeypatch,
        'datasets = ["zroot/from-file"]\nlock_lease_seconds = 45\nredis_url = "redis://file:6379/0"\n',
    )
    monkeypatch.setenv("HOSTER_DATASETS", '["zroot/from-env"]')
    monkeypatch.setenv("HOSTER_LOCK_LEASE_SECONDS", "75")
    s = Settings.from_env()
    assert s.datasets == ["zroot/from-env"]
    assert s.lock_lease_seconds == 75.0
    assert s.redis_url == "redis://file:6379/0"  # not overridden: the file's value


def test_init_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_RETRY_MAX", "7")
    assert Settings.from_env(retry_max=2).retry_max == 2


def test_env_table_replaces_file_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        monkeypatch,
        '[snapshot_schedule.hourly]\ncron = "33 * * * *"\nstype = "hourly"\nkeep = 3\n'
        '[snapshot_schedule.daily]\ncron = "5 4 * * *"\nstype = "daily"\nkeep = 5\n',
    )
    monkeypatch.setenv(
        "HOSTER_SNAPSHOT_SCHEDULE", json.dumps({"weekly": {"cron": "5 5 * * 3", "stype": "weekly", "keep": 3}})
    )
    assert sorted(Settings.from_env().snapshot_schedule) == ["weekly"]


def test_several_invalid_settings_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_LOCK_LEASE_SECONDS", "-1")
    monkeypatch.setenv("HOSTER_NODE_NAME", "bad name;rm")
    monkeypatch.setenv("HOSTER_DATASETS", '["zroot/a;b"]')
    monkeypatch.setenv("HOSTER_RETRY_MAX", "many")
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    message = str(info.value)
    assert message.startswith("invalid settings:")
    for field in ("lock_lease_seconds", "node_name", "datasets", "retry_max"):
        assert field in message, message
    assert len(message.split("; ")) >= 4 and "\n" not in message  # all at once, on one line


def test_invalid_nested_values_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        tmp_path,
        monkeypatch,
        """
[[targets]]
name = "bad name"
host = "h"
root_map = { "zroot/a;b" = "backup" }
keep = { hourly = 0 }

[snapshot_schedule.hourly]
cron = "33 * * *"
stype = "minutely"
keep = 0
""",
    )
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    message = str(info.value)
    for where in ("targets.0.name", "targets.0.root_map", "targets.0.keep", "snapshot_schedule.hourly.cron",
                  "snapshot_schedule.hourly.stype", "snapshot_schedule.hourly.keep"):
        assert where in message, message


def test_unknown_key_in_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, monkeypatch, "lock_lease_secnds = 30\n")
    with pytest.raises(ConfigError, match="lock_lease_secnds"):
        Settings.from_env()


def test_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.from_env()


def test_malformed_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, monkeypatch, "datasets = [\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.from_env()


def test_duplicate_target_names_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET, {**TARGET, "host": "10.0.0.9"}]))
    with pytest.raises(ConfigError, match="unique"):
        Settings.from_env()


def test_replication_schedule_with_unknown_endpoint_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET]))
    monkeypatch.setenv(
        "HOSTER_REPLICATION_SCHEDULE", json.dumps({"x": {"cron": "50 * * * *", "endpoint": "offsite9"}})
    )
    with pytest.raises(ConfigError, match="offsite9"):
        Settings.from_env()


def test_replication_schedule_may_name_endpoint_by_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET]))
    monkeypatch.setenv(
        "HOSTER_REPLICATION_SCHEDULE", json.dumps({"x": {"cron": "50 * * * *", "endpoint": "10.5.199.85"}})
    )
    assert Settings.from_env().replication_schedule["x"].endpoint == "10.5.199.85"


# -- endpoints -----------------------------------------------------------------------------------------


def test_endpoint_lookup_by_name_or_host(monkeypatch: pytest.MonkeyPatch) -> None:
    other = {"name": "offsite01", "host": "offsite01.example.net", "port": 2222}
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET, other]))
    s = Settings.from_env()
    assert s.endpoint("hoster01").host == "10.5.199.85"
    assert s.endpoint("10.5.199.85").name == "hoster01"
    assert s.endpoint("offsite01.example.net").port == 2222


def test_unknown_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTER_TARGETS", json.dumps([TARGET]))
    with pytest.raises(ConfigError, match=r"unknown endpoint 'nowhere' \(known: hoster01\)"):
        Settings.from_env().endpoint("nowhere")


def test_unknown_endpoint_none_configured() -> None:
    with pytest.raises(ConfigError, match="none configured"):
        Settings.from_env().endpoint("hoster01")


@pytest.mark.parametrize(
    "source, target",
    [
        ("zroot/vm-encrypted/web1", "bk/enc/web1"),
        ("zroot/vm-encrypted", "bk/enc"),
        ("zroot/vm-unencrypted/web1", "backup/vm-unencrypted/web1"),  # shorter prefix "zroot"
        ("zroot/vm-encrypted2/web1", "backup/vm-encrypted2/web1"),  # not under zroot/vm-encrypted
        ("zroot", "backup"),
        ("zrootx/web1", "zrootx/web1"),  # no prefix match: identity
        ("tank/web1", "tank/web1"),
    ],
)
def test_target_dataset_longest_prefix_wins(source: str, target: str) -> None:
    ep = Endpoint(
        name="hoster01", host="h", root_map={"zroot": "backup", "zroot/vm-encrypted": "bk/enc"}
    )
    assert ep.target_dataset(source) == target


def test_target_dataset_identity_by_default() -> None:
    assert Endpoint(name="hoster01", host="h").target_dataset("zroot/vm-encrypted/web1") == "zroot/vm-encrypted/web1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad name"},
        {"name": "-x"},
        {"root_map": {"zroot/a b": "backup"}},
        {"root_map": {"zroot": "backup/$(x)"}},
        {"keep": {"hourly": 0}},
        {"keep": {"autosnap": 3}},
    ],
)
def test_endpoint_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"name": "hoster01", "host": "h"}
    with pytest.raises(ValueError):
        Endpoint(**{**base, **kwargs})  # type: ignore[arg-type]

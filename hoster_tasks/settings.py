"""Typed settings: one object, built from HOSTER_* environment variables over an optional TOML file.

`Settings.from_env()` is the only constructor the rest of the code uses. Invalid settings raise
`ConfigError` listing every problem at once.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hoster_tasks.config_file import DEFAULT_REDIS_URL, config_file_values
from hoster_tasks.errors import ConfigError
from hoster_tasks.keys import BEAT_LOCK
from hoster_tasks.names import SNAPSHOT_TYPES, validate_dataset, validate_node_name
from hoster_tasks.redis_conn import check_url


class Endpoint(BaseModel, frozen=True):
    """A replication target: a node reachable over SSH."""

    name: str
    host: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None
    # source root -> target root ("zroot/vm-encrypted" -> "backup/vm-encrypted"); identity when absent.
    root_map: dict[str, str] = Field(default_factory=dict)
    connect_timeout: int = 10
    keepalive_seconds: int = 5  # ssh ServerAliveInterval; 3 missed replies end a stalled transfer
    # A transfer that moves no byte this long is stopped and retried (resumed from its token where ZFS
    # can): catches what ssh keepalives cannot, a live connection over which nothing flows.
    stall_seconds: float = Field(default=300.0, gt=0)
    # Per-type keep counts on the target; empty means "mirror the source's pruning".
    keep: dict[str, int] = Field(default_factory=dict)
    # An encrypted dataset is sent raw (it stays encrypted on the target) or not at all; true allows a
    # decrypted (plaintext) copy where either side's ZFS has no raw send (zfs send -w).
    send_decrypted: bool = False
    # replicate-all: how many of a job's datasets are sent to this target at once (each in its own chain; the
    # job runs this many lanes, each taking the job's next dataset when its last one is done). Also bounded
    # by the worker's concurrency.
    parallel: int = Field(default=2, ge=1, le=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_node_name(v)

    @field_validator("root_map")
    @classmethod
    def _roots(cls, v: dict[str, str]) -> dict[str, str]:
        for src, dst in v.items():
            validate_dataset(src)
            validate_dataset(dst)
        return v

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: dict[str, int]) -> dict[str, int]:
        for stype, n in v.items():
            if stype not in SNAPSHOT_TYPES or n < 1:
                raise ValueError(f"keep[{stype!r}]={n}: type must be one of {SNAPSHOT_TYPES}, keep >= 1")
        return v

    def target_dataset(self, source: str) -> str:
        for src_root, dst_root in sorted(self.root_map.items(), key=lambda kv: -len(kv[0])):
            if source == src_root or source.startswith(src_root + "/"):
                return dst_root + source[len(src_root):]
        return source


class ScheduleEntry(BaseModel, frozen=True):
    """One beat entry: a 5-field crontab in UTC."""

    cron: str
    stype: str = "hourly"
    keep: int = 3

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron {v!r} must have 5 fields: minute hour day-of-month month day-of-week")
        return v

    @field_validator("stype")
    @classmethod
    def _stype(cls, v: str) -> str:
        if v not in SNAPSHOT_TYPES:
            raise ValueError(f"stype {v!r} must be one of {SNAPSHOT_TYPES}")
        return v

    @field_validator("keep")
    @classmethod
    def _keep_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("keep must be at least 1")
        return v


class ReplicationEntry(BaseModel, frozen=True):
    cron: str
    endpoint: str
    speed_limit: float | None = None
    script_name: str | None = None


DEFAULT_SNAPSHOT_SCHEDULE = {
    "hourly": ScheduleEntry(cron="33 * * * *", stype="hourly", keep=3),
    "daily": ScheduleEntry(cron="5 4 * * *", stype="daily", keep=5),
    "weekly": ScheduleEntry(cron="5 5 * * 3", stype="weekly", keep=3),
    "monthly": ScheduleEntry(cron="5 3 15 * *", stype="monthly", keep=6),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOSTER_", extra="forbid", frozen=True)

    redis_url: str = DEFAULT_REDIS_URL
    node_name: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    # Hoster's active_datasets: each VM is a child dataset <root>/<vm>.
    datasets: list[str] = Field(default_factory=lambda: ["zroot/vm-encrypted"])
    zfs_command: str = "zfs"
    lock_lease_seconds: float = 60.0
    lock_wait_seconds: float = 30.0
    # One attempt blocks a worker slot at most this long; the rest of the wait is task retries, which free the
    # slot (a chain's next link may need it to release the very lock being waited for).
    lock_attempt_seconds: float = 2.0
    heartbeat_seconds: float = 10.0
    error_dir: Path = Path("/var/run/replication")
    metrics_textfile: Path | None = None
    targets: list[Endpoint] = Field(default_factory=list)
    snapshot_schedule: dict[str, ScheduleEntry] = Field(
        default_factory=lambda: dict(DEFAULT_SNAPSHOT_SCHEDULE)
    )
    replication_schedule: dict[str, ReplicationEntry] = Field(default_factory=dict)
    retry_max: int = 5
    retry_backoff_max_seconds: int = 600
    # Redis redelivers a message still unacked this long after delivery: a retry countdown (held unacked by
    # the worker until it is due) must stay below it, or the retry would run twice.
    visibility_timeout_seconds: int = 3600
    sentry_dsn: str | None = None
    sentry_environment: str = "production"
    sentry_release: str | None = None
    task_wait_seconds: float = 3600.0
    # Beat (celery-redbeat, hoster_tasks/beat.py): the firing beat extends its lock every loop (at most
    # beat_max_loop_seconds apart); a standby takes over at most beat_lock_timeout_seconds after it died.
    beat_max_loop_seconds: float = 5.0
    beat_lock_timeout_seconds: float = 30.0
    beat_lock_key: str = BEAT_LOCK
    beat_redis_retry_seconds: float = 300.0  # beat retries Redis this long (a failover) before it exits
    # Stopping and starting VMs (rollback --force-stop/--force-start): "hoster" runs these argv templates
    # ({vm} is the VM name); "file" keeps VM states in vm_state_file (tests, the sandbox: no bhyve there).
    vm_control: Literal["hoster", "file"] = "hoster"
    vm_state_file: Path | None = None
    vm_stop_command: list[str] = Field(default_factory=lambda: ["hoster", "vm", "stop", "{vm}"])
    vm_start_command: list[str] = Field(default_factory=lambda: ["hoster", "vm", "start", "{vm}"])
    vm_running_command: list[str] = Field(default_factory=lambda: ["test", "-e", "/dev/vmm/{vm}"])  # exit 0: runs
    vm_stop_timeout_seconds: float = 120.0
    # `vm cireset` / `vm change-parent --cireset`: Hoster resets the guest's settings (cloud-init, passwords,
    # network) for its new host; hoster-tasks only calls it and reports the outcome.
    vm_cireset_command: list[str] = Field(default_factory=lambda: ["hoster", "vm", "cireset", "{vm}"])
    # Where a raw-received encrypted copy's key is, for a failover: a file URL template ({vm}), e.g.
    # "file:///root/keys/{vm}.key". Unset: a failover of an encrypted copy stops with a clear message.
    vm_key_location: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return check_url(v)  # a sentinel:// URL names its sentinels and master (redis_conn.py)

    @model_validator(mode="after")
    def _beat_lock_outlives_loop(self) -> Settings:
        if self.beat_max_loop_seconds <= 0 or self.beat_lock_timeout_seconds < 3 * self.beat_max_loop_seconds:
            raise ValueError("beat_lock_timeout_seconds must be at least 3 x beat_max_loop_seconds (> 0): the "
                             "firing beat extends its lock once a loop, and a lapsed lock lets a second beat fire")
        return self

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str]) -> list[str]:
        for ds in v:
            validate_dataset(ds)
        return v

    @field_validator("node_name")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_node_name(v)

    @field_validator("lock_lease_seconds", "lock_wait_seconds", "lock_attempt_seconds", "heartbeat_seconds")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _countdowns_below_visibility(self) -> Settings:
        for name in ("retry_backoff_max_seconds", "lock_lease_seconds", "lock_wait_seconds"):
            if getattr(self, name) >= self.visibility_timeout_seconds:
                raise ValueError(f"{name} ({getattr(self, name)}) must be below visibility_timeout_seconds "
                                 f"({self.visibility_timeout_seconds}): a message held that long is delivered twice")
        return self

    @model_validator(mode="after")
    def _targets_unique(self) -> Settings:
        names = [t.name for t in self.targets]
        if len(names) != len(set(names)):
            raise ValueError(f"target names must be unique: {names}")
        for entry in self.replication_schedule.values():
            if entry.endpoint not in names and not any(t.host == entry.endpoint for t in self.targets):
                raise ValueError(f"replication_schedule names unknown endpoint {entry.endpoint!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFile(settings_cls))

    def endpoint(self, name_or_host: str) -> Endpoint:
        for t in self.targets:
            if name_or_host in (t.name, t.host):
                return t
        known = ", ".join(t.name for t in self.targets) or "none configured"
        raise ConfigError(f"unknown endpoint {name_or_host!r} (known: {known})")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = [f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
            raise ConfigError("invalid settings: " + "; ".join(problems)) from None


class _TomlFile(PydanticBaseSettingsSource):
    """The file named by HOSTER_CONFIG (TOML), lowest priority."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return config_file_values()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()

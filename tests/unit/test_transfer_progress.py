"""Bytes remaining: what a transfer records (throttled, best effort) and what the metrics make of it."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from hoster_tasks.observability import progress
from hoster_tasks.observability.metrics import HELP, _replication_samples, render_metrics
from hoster_tasks.observability.progress import TransferProgress, remaining_of


class RecordingPipe:
    """The few pipeline calls state.record_replication makes, recorded into one dict of hash fields."""

    def __init__(self, store: dict[str, str]) -> None:
        self.store = store

    def hset(self, key: str, mapping: dict[str, str]) -> None:
        self.store.update(mapping)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: None  # expire, zadd, ...: the index, not under test here

    def execute(self) -> list[Any]:
        return []


class RecordingClient:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.writes = 0

    def pipeline(self) -> RecordingPipe:
        self.writes += 1
        return RecordingPipe(self.fields)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_progress_is_throttled_and_ends_at_zero() -> None:
    client, clock = RecordingClient(), Clock()
    rec = TransferProgress(client, "n1", "tank/vm/a", "backup", clock=clock)  # type: ignore[arg-type]
    rec.update(100, 1000)
    assert remaining_of(client.fields, clock.now) == 900
    rec.update(200, 1000)  # within the same second: not written
    assert client.writes == 1 and remaining_of(client.fields, clock.now) == 900
    clock.now += 1.5
    rec.update(1200, 1000)  # the estimate was low: never negative
    assert remaining_of(client.fields, clock.now) == 0 and client.fields[progress.SENT] == "1200"
    clock.now += 0.1
    rec.update(100, None)  # a resumed send has no estimate
    rec.done()
    assert remaining_of(client.fields, clock.now) == 0 and client.writes == 3


def test_a_transfer_that_never_reported_writes_nothing() -> None:
    client = RecordingClient()
    TransferProgress(client, "n1", "tank/vm/a", "backup").done()  # type: ignore[arg-type]
    assert client.writes == 0


def test_a_failing_redis_never_reaches_the_pv_reader_thread() -> None:
    class Down:
        def pipeline(self) -> Any:
            raise ConnectionError("redis is down")

    rec = TransferProgress(Down(), "n1", "tank/vm/a", "backup")  # type: ignore[arg-type]
    rec.update(1, 2)
    rec.done()


def test_remaining_is_unknown_without_an_estimate_and_zero_once_stale() -> None:
    fresh = {progress.REMAINING: "", progress.UPDATED: "1000"}
    assert remaining_of(fresh, 1001) is None
    assert remaining_of({progress.REMAINING: "5", progress.UPDATED: "1000"}, 1000 + progress.STALE_SECONDS + 1) == 0
    assert remaining_of({}, 1000) == 0  # never transferred since: idle


def test_metrics_export_remaining_and_lag_per_dataset_and_target() -> None:
    out: dict[str, list[str]] = {name: [] for name in HELP}
    states = {
        ("tank/vm/a", "backup"): {progress.REMAINING: "4096", progress.UPDATED: "1000",
                                  "target_newest_creation": "400"},
        ("tank/vm/a", "offsite"): {"last_success": "900"},  # idle, never reported progress
        ("tank/vm/b", "backup"): {progress.REMAINING: "", progress.UPDATED: "1000"},  # no estimate yet
    }
    _replication_samples(out, "n1", states, now=1000)
    samples = {(s.name, s.labels["dataset"], s.labels["target"]): s.value
               for f in text_string_to_metric_families(render_metrics(out)) for s in f.samples}
    assert samples[("hoster_tasks_replication_bytes_remaining", "tank/vm/a", "backup")] == 4096
    assert samples[("hoster_tasks_replication_bytes_remaining", "tank/vm/a", "offsite")] == 0
    assert ("hoster_tasks_replication_bytes_remaining", "tank/vm/b", "backup") not in samples
    assert samples[("hoster_tasks_replication_lag_seconds", "tank/vm/a", "backup")] == 600

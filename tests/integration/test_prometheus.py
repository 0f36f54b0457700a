"""The shipped alert rules in the real `prometheus`, scraping `hoster-tasks metrics --serve` while a real worker
replicates: a failing replication raises HosterReplicationFailing, a stopped worker raises HosterNodeDown, and
a slow transfer's bytes remaining are in the scraped series.

The rules are loaded from a copy of ops/prometheus/alerts.yml whose `for:` durations are shortened to a few
seconds (the shipped ones are 5 to 15 minutes); their expressions are the shipped ones, unchanged (asserted).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from harness import zfs as hz
from harness.proc import free_port, stop_process, tail, wait_until
from scenario import PROJECT_ROOT, VMS_ROOT, two_nodes

ALERTS = PROJECT_ROOT / "ops" / "prometheus" / "alerts.yml"
SHORT_FOR = "2s"  # long enough to pass through `pending`, short enough for a test


@dataclass
class Prometheus:
    base: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        res = requests.get(self.base + path, params=params, timeout=10)
        res.raise_for_status()
        body = res.json()
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self, name: str, state: str = "firing", **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == state
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_alert(self, name: str, timeout: float = 60, **labels: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = wait_until(
            lambda: self.alerts(name, **labels), timeout, f"alert {name} {labels} to fire", interval=0.5,
            on_timeout=lambda: f"alerts: {self.get('/api/v1/alerts')}\nprometheus log:\n{tail(self.log)}")
        return found[0]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])


def shortened_rules(dest: Path) -> Path:
    """alerts.yml with every `for:` shortened; expressions, labels and annotations as shipped."""
    data = yaml.safe_load(ALERTS.read_text())
    shipped = [r["expr"] for g in data["groups"] for r in g["rules"]]
    for group in data["groups"]:
        for rule in group["rules"]:
            rule["for"] = SHORT_FOR
    assert [r["expr"] for g in data["groups"] for r in g["rules"]] == shipped
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def _spawn(argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)


@pytest.fixture
def exporter(redis_server, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`hoster-tasks metrics --serve` in the root namespace: the scrape target, as host:port."""
    port, log = free_port(), tmp_path / "exporter.log"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTER_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}
    proc = _spawn([sys.executable, "-m", "hoster_tasks", "metrics", "--serve", str(port)], log, env=env,
                  cwd=PROJECT_ROOT)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited {proc.returncode}:\n{tail(log)}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, 30, "the metrics exporter", interval=0.2, on_timeout=lambda: tail(log))
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10, group=True)


@pytest.fixture
def prometheus(exporter: str, tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (scripts/bootstrap.sh installs the Debian package)")
    rules = shortened_rules(tmp_path / "alerts.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "hoster-tasks", "static_configs": [{"targets": [exporter]}]}],
    }))
    port, log = free_port(), tmp_path / "prometheus.log"
    proc = _spawn([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}"], log, cwd=tmp_path)
    prom = Prometheus(f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}:\n{tail(log)}")
        try:
            return requests.get(prom.base + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 60, "prometheus to be ready", interval=0.3, on_timeout=lambda: tail(log))
        yield prom
    finally:
        stop_process(proc, timeout=15, group=True)


def test_shipped_alerts_fire_in_prometheus_on_a_failing_replication_and_a_stopped_worker(
    prometheus, node_factory, pool_factory, worker_factory, cli
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 8)
    assert cli("snapshot", "new", "vm1").returncode == 0
    # slow enough for a few scrapes to see the transfer under way
    ok = cli("vm", "replicate", "vm1", "--endpoint", "dst", "--speed-limit", "2")
    assert ok.returncode == 0, ok.stderr
    bad = cli("vm", "replicate", "vm1", "--endpoint", "broken")
    assert bad.returncode == 1, bad.stderr

    failing = prometheus.wait_alert("HosterReplicationFailing", node="src", dataset=vm, target="broken")
    assert failing["labels"]["severity"] == "critical"
    assert "is failing" in failing["annotations"]["summary"]
    assert not prometheus.alerts("HosterReplicationFailing", state="firing", target="dst")
    assert not prometheus.alerts("HosterReplicationFailing", state="pending", target="dst")
    assert not prometheus.alerts("HosterNodeDown", state="firing")
    assert not prometheus.alerts("HosterMetricsMissing", state="firing")

    # bytes remaining: above zero during the transfer (kept in Prometheus' history), zero once it ended
    seen = prometheus.query('max_over_time(hoster_tasks_replication_bytes_remaining{target="dst"}[5m])')
    assert seen and float(seen[0]["value"][1]) > 0, seen
    now = prometheus.query('hoster_tasks_replication_bytes_remaining{target="dst"}')
    assert [float(s["value"][1]) for s in now] == [0], now
    lag = prometheus.query(f'hoster_tasks_replication_lag_seconds{{dataset="{vm}", target="dst"}}')
    assert len(lag) == 1 and 0 <= float(lag[0]["value"][1]) < 600, lag

    worker.stop()  # its heartbeat key expires within three heartbeats: node_up 0
    down = prometheus.wait_alert("HosterNodeDown", node="src")
    assert down["labels"]["severity"] == "critical" and "src" in down["annotations"]["summary"]

"""The deployment and operations files (docker/, ops/) parse, agree with each other and with the
published contract (metric and task names, settings), and pass the real tools where they exist here:
`docker compose config`, `promtool`, `systemd-analyze verify`, `sh -n`.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
OPS = ROOT / "ops"

KNOWN_METRICS = frozenset({
    "hoster_tasks_last_snapshot_timestamp_seconds",
    "hoster_tasks_last_replication_success_timestamp_seconds",
    "hoster_tasks_replication_bytes_total",
    "hoster_tasks_last_replication_duration_seconds",
    "hoster_tasks_replication_failures_total",
    "hoster_tasks_replication_lag_seconds",
    "hoster_tasks_replication_bytes_remaining",
    "hoster_tasks_replication_error",
    "hoster_tasks_node_last_heartbeat_timestamp_seconds",
    "hoster_tasks_node_up",
})
PUBLIC_TASKS = frozenset({
    "hoster.snapshot.take", "hoster.snapshot.take_all", "hoster.snapshot.fanout", "hoster.snapshot.list",
    "hoster.snapshot.destroy", "hoster.replication.replicate", "hoster.replication.replicate_all",
    "hoster.replication.retry_failed",
})
CONTROL_TASKS = frozenset({"hoster.replication.retry_failed"})  # sent to the control queue, not a node's
UNITS = ("hoster-tasks-worker.service", "hoster-tasks-beat.service", "hoster-tasks-flower.service")
RC_SCRIPTS = ("hoster_tasks_worker", "hoster_tasks_beat", "hoster_tasks_flower")


@pytest.fixture(scope="module")
def yaml() -> ModuleType:
    return pytest.importorskip("yaml")


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)


# -- PromQL metric names ----------------------------------------------------------------------------

_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left after removing strings, label matchers,
    ranges, label lists, Grafana variables, function/aggregation names, keywords and number suffixes."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 5m, 1e3, 0.5e2
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_name_parser_sees_through_promql() -> None:
    assert metric_names('max by (node, target) (up{job="a", x=~"$node"}[5m]) or vector(0)') == {"up"}
    assert metric_names("time() - max(hoster_tasks_node_up offset 5m) > 2 * 3600 and on(node) foo") == {
        "hoster_tasks_node_up", "foo"}
    assert metric_names('sum(rate(x_total{a="b{c}"}[$__rate_interval])) by (a) > 1e3') == {"x_total"}


# -- docker -----------------------------------------------------------------------------------------

def _compose(yaml: ModuleType) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def test_compose_has_redis_with_password_and_persistence(yaml: ModuleType) -> None:
    services = _compose(yaml)["services"]
    assert {"redis", "beat", "flower"} <= set(services)
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    # the password comes from a secret file (docker/redis/start.sh: an ACL file), the settings from redis.conf
    assert [str(c) for c in redis["command"]] == ["sh", "/usr/local/etc/redis/start.sh"]
    assert redis["secrets"] == ["redis_password"]
    assert _compose(yaml)["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    mounts = {v.split(":")[1]: v.split(":")[0] for v in map(str, redis["volumes"])}
    assert mounts["/usr/local/etc/redis/start.sh"] == "./redis/start.sh"
    assert mounts["/usr/local/etc/redis/redis.conf"] == "./redis/redis.conf"
    conf = dict(line.split(None, 1) for line in (DOCKER / "redis" / "redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "/run/secrets/redis_password" in " ".join(redis["healthcheck"]["test"])
    # published on an explicit (default loopback) address, never on every interface by accident
    assert all(str(p).startswith("${REDIS_BIND:-127.0.0.1}:") for p in redis["ports"])


def test_no_password_on_any_command_line(yaml: ModuleType) -> None:
    """Command lines are readable by every local user (`ps`) and shown by `docker inspect`."""
    compose = _compose(yaml)
    for name, svc in compose["services"].items():
        for field in ("command", "entrypoint"):
            line = " ".join(map(str, svc.get(field) or []))
            assert "PASSWORD" not in line and "requirepass" not in line and "BASIC_AUTH" not in line, (name, field)
        check = " ".join(map(str, svc.get("healthcheck", {}).get("test", [])))
        assert "${" not in check, name  # compose would write the value itself into the container's config
    assert "requirepass" not in (DOCKER / "redis" / "redis.conf").read_text()
    assert "PASSWORD" not in (DOCKER / "redis" / "redis.conf").read_text()


def test_compose_beat_and_flower(yaml: ModuleType) -> None:
    services = _compose(yaml)["services"]
    beat, flower = services["beat"], services["flower"]
    assert beat["command"][0] == "beat"
    assert "replicas" not in beat.get("deploy", {}), "exactly one beat may run"
    assert flower["command"][0] == "flower"
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    for svc in (beat, flower):
        url = svc["environment"]["HOSTER_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.control"
        assert (DOCKER / svc["build"]["context"]).resolve() == ROOT
        assert "hoster-tasks-healthcheck" in " ".join(svc["healthcheck"]["test"])
    targets = [v["target"] if isinstance(v, dict) else str(v).split(":")[1] for v in beat["volumes"]]
    assert "/var/lib/hoster-tasks" in targets  # the schedule file survives a restart
    assert "/etc/hoster-tasks/config.toml" in targets


def test_env_example_defines_every_required_compose_variable() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (DOCKER / "compose.yml").read_text()))
    assert {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "HOSTER_CONFIG_FILE"} <= required
    env = _env_example()
    assert required <= {k for k, v in env.items() if v}


def test_docker_compose_config_accepts_the_file() -> None:
    if shutil.which("docker") is None or _run(["docker", "compose", "version"]).returncode != 0:
        pytest.skip("docker compose plugin not available")
    env = {k: v for k, v in os.environ.items() if k not in _env_example()}
    res = _run(["docker", "compose", "-f", str(DOCKER / "compose.yml"), "--env-file",
                str(DOCKER / ".env.example"), "config", "-q"], env=env)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.control"])
def test_dockerfiles_copy_existing_paths_and_run_the_cli(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm\b", text, re.M)
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        *sources, _dest = [p for p in line.split() if not p.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
    assert 'ENTRYPOINT ["hoster-tasks"]' in text
    assert "HEALTHCHECK" in text


def test_worker_image_has_the_replication_tools_and_documents_zfs_access() -> None:
    text = (DOCKER / "Dockerfile.worker").read_text()
    for pkg in ("openssh-client", "pv", "mbuffer", "zfsutils-linux"):
        assert re.search(rf"install\b[^\n]*\b{re.escape(pkg)}\b", text), pkg
    assert "contrib" in text
    assert "--device /dev/zfs" in text and "--privileged" in text
    assert "FreeBSD" in text
    assert 'CMD ["worker"]' in text


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hoster_healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, Any]]]:
    reply: dict[str, Any] = {"status": 200, "body": b"OK"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(reply["status"])
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthcheck", reply
    finally:
        server.shutdown()
        server.server_close()


def test_flower_healthcheck_reads_flowers_answer(http_server: tuple[str, dict[str, Any]]) -> None:
    url, reply = http_server
    hc = _load_healthcheck()
    assert hc.main(["hc", "flower", url]) == 0
    reply["body"] = b"not ok"
    assert hc.main(["hc", "flower", url]) == 1
    reply["status"] = 503
    assert hc.main(["hc", "flower", url]) == 1
    assert hc.main(["hc", "flower", "http://127.0.0.1:9/healthcheck"]) == 1  # nothing listens
    assert hc.main(["hc", "nonsense"]) == 2


def test_beat_healthcheck_wants_a_fresh_schedule_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hc = _load_healthcheck()
    redis_mod = pytest.importorskip("redis")
    monkeypatch.setattr(redis_mod.Redis, "ping", lambda self: True)
    monkeypatch.setenv("HOSTER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.chdir(tmp_path)
    assert hc.beat() is False  # no schedule file yet
    f = tmp_path / "celerybeat-schedule.dat"
    f.write_bytes(b"x")
    assert hc.beat() is True
    old = f.stat().st_mtime - hc.BEAT_SCHEDULE_MAX_AGE - 60
    os.utime(f, (old, old))
    assert hc.beat() is False


# -- Prometheus -------------------------------------------------------------------------------------

def _rules(yaml: ModuleType) -> list[dict[str, Any]]:
    data = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alerts_use_only_published_metrics(yaml: ModuleType) -> None:
    rules = _rules(yaml)
    assert rules
    used: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= KNOWN_METRICS, f"{rule['alert']}: unknown metrics {names - KNOWN_METRICS}"
        used |= names
    # failing replication, lag, no snapshot, node down
    assert {"hoster_tasks_replication_error", "hoster_tasks_replication_lag_seconds",
            "hoster_tasks_last_snapshot_timestamp_seconds", "hoster_tasks_node_up"} <= used


def test_published_metrics_are_what_the_exporter_writes_and_follow_the_conventions() -> None:
    from hoster_tasks.observability.metrics import HELP

    assert set(HELP) == KNOWN_METRICS
    for name, (kind, _text) in HELP.items():
        assert name.startswith("hoster_tasks_") and re.fullmatch(r"[a-z_]+", name), name
        assert name.endswith("_total") == (kind == "counter"), name
        if "timestamp" in name or "duration" in name or "lag" in name:
            assert name.endswith("_seconds"), name  # base units: seconds, never minutes or ms
        if "bytes" in name:
            assert re.search(r"_bytes_(total|remaining)$", name), name


def test_alert_lag_threshold_is_two_hours_for_fifteen_minutes(yaml: ModuleType) -> None:
    lag = [r for r in _rules(yaml) if "hoster_tasks_replication_lag_seconds" in r["expr"]]
    assert any(re.search(r">\s*(2\s*\*\s*3600|7200)\b", r["expr"]) and r["for"] == "15m" for r in lag)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: prometheus)")
    return path


def test_promtool_checks_rules_and_config() -> None:
    promtool = _promtool()
    res = _run([promtool, "check", "rules", str(OPS / "prometheus" / "alerts.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run([promtool, "check", "config", str(OPS / "prometheus" / "scrape.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_alerts_fire_once_per_dataset_under_promtool(yaml: ModuleType, tmp_path: Path) -> None:
    """Synthetic series through `promtool test rules`; annotations are stripped (their templates are
    checked by `promtool check rules`), and two exporters of the same series give one alert."""
    promtool = _promtool()
    data = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(data))
    ds = {"node": "h2", "dataset": "zroot/vm-encrypted/vm1", "target": "h1"}
    both = [dict(ds, instance=i) for i in ("a:9100", "b:9100")]

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {"exp_labels": {"severity": severity, **labels}}

    tests = [
        {"interval": "1m", "input_series": [_series("hoster_tasks_replication_error", "0 1x40", **lb) for lb in both],
         "alert_rule_test": [
             {"eval_time": "5m", "alertname": "HosterReplicationFailing", "exp_alerts": []},
             {"eval_time": "20m", "alertname": "HosterReplicationFailing",
              "exp_alerts": [alert("HosterReplicationFailing", "critical", **ds)]}]},
        {"interval": "1m",
         "input_series": [_series("hoster_tasks_replication_lag_seconds", "7300x40", **both[0]),
                          _series("hoster_tasks_replication_lag_seconds", "7400x40", **both[1])],
         "alert_rule_test": [
             {"eval_time": "10m", "alertname": "HosterReplicationLagHigh", "exp_alerts": []},
             {"eval_time": "20m", "alertname": "HosterReplicationLagHigh",
              "exp_alerts": [alert("HosterReplicationLagHigh", "warning", **ds)]},
             {"eval_time": "20m", "alertname": "HosterReplicationLagCritical", "exp_alerts": []}]},
        {"interval": "1m",
         "input_series": [_series("hoster_tasks_replication_failures_total", "0+1x4 4x360", **ds)],
         "alert_rule_test": [{"eval_time": "30m", "alertname": "HosterReplicationFlapping",
                              "exp_alerts": [alert("HosterReplicationFlapping", "warning", **ds)]}]},
        {"interval": "1m",  # snapshot timestamp stuck at 0: older than 1 h from t=60m, alert after 15m more
         "input_series": [_series("hoster_tasks_last_snapshot_timestamp_seconds", "0x120",
                                  node="h2", dataset="zroot/vm-encrypted/vm1")],
         "alert_rule_test": [
             {"eval_time": "70m", "alertname": "HosterNoRecentSnapshot", "exp_alerts": []},
             {"eval_time": "80m", "alertname": "HosterNoRecentSnapshot",
              "exp_alerts": [alert("HosterNoRecentSnapshot", "warning", node="h2",
                                   dataset="zroot/vm-encrypted/vm1")]}]},
        {"interval": "1m",
         "input_series": [_series("hoster_tasks_node_up", "0x30", node="down1"),
                          _series("hoster_tasks_node_up", "1x30", node="stale"),
                          _series("hoster_tasks_node_last_heartbeat_timestamp_seconds", "0x30", node="stale"),
                          _series("hoster_tasks_node_up", "1x30", node="fine"),
                          _series("hoster_tasks_node_last_heartbeat_timestamp_seconds", "0+60x30", node="fine")],
         "alert_rule_test": [
             {"eval_time": "15m", "alertname": "HosterNodeDown",
              "exp_alerts": [alert("HosterNodeDown", "critical", node="down1"),
                             alert("HosterNodeDown", "critical", node="stale")]},
             {"eval_time": "15m", "alertname": "HosterMetricsMissing", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [_series("hoster_tasks_replication_error", "0x30", **ds)],
         "alert_rule_test": [{"eval_time": "20m", "alertname": "HosterMetricsMissing",
                              "exp_alerts": [alert("HosterMetricsMissing", "warning")]}]},
    ]
    (tmp_path / "test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    res = _run([promtool, "test", "rules", "test.yml"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scrape_example_loads_the_alert_rules(yaml: ModuleType) -> None:
    data = yaml.safe_load((OPS / "prometheus" / "scrape.yml").read_text())
    assert "alerts.yml" in data["rule_files"]
    assert any(job["job_name"] == "node" for job in data["scrape_configs"])


# -- Grafana ----------------------------------------------------------------------------------------

def _dashboard() -> dict[str, Any]:
    return json.loads((OPS / "grafana" / "hoster-tasks.json").read_text())


def _panel_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_uses_only_published_metrics() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and names <= KNOWN_METRICS, f"{panel['title']}: {names - KNOWN_METRICS}"
            used |= names
    # lag, snapshot age, bytes, durations, failures, node up
    assert {"hoster_tasks_replication_lag_seconds", "hoster_tasks_last_snapshot_timestamp_seconds",
            "hoster_tasks_replication_bytes_total", "hoster_tasks_last_replication_duration_seconds",
            "hoster_tasks_replication_failures_total", "hoster_tasks_node_up",
            "hoster_tasks_replication_bytes_remaining"} <= used
    for var in dash["templating"]["list"]:
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.match(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", query)
        if var["type"] == "query":
            assert m and m.group(1) in KNOWN_METRICS, var["name"]


def test_grafana_exprs_parse_as_promql(tmp_path: Path, yaml: ModuleType) -> None:
    promtool = _promtool()
    rules = [{"record": f"check:panel_{i}", "expr": re.sub(r"\$\{?\w+\}?", ".*", expr)}
             for i, (_title, expr) in enumerate(_panel_exprs(_dashboard()))]
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _run([promtool, "check", "rules", str(tmp_path / "r.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


# -- configuration ----------------------------------------------------------------------------------

def _sample() -> dict[str, Any]:
    with open(OPS / "config.sample.toml", "rb") as fh:
        return tomllib.load(fh)


def test_sample_config_parses_and_is_consistent() -> None:
    cfg = _sample()
    assert cfg["datasets"] == ["zroot/vm-encrypted"]
    names = {t["name"] for t in cfg["targets"]}
    for t in cfg["targets"]:
        assert {"name", "host", "key_file", "known_hosts", "root_map"} <= set(t)
    for entry in cfg["replication_schedule"].values():
        assert entry["endpoint"] in names
    crons = {k: (v["cron"], v["stype"], v["keep"]) for k, v in cfg["snapshot_schedule"].items()}
    assert crons == {  # the seed's cron lines
        "hourly": ("33 * * * *", "hourly", 3), "daily": ("5 4 * * *", "daily", 5),
        "weekly": ("5 5 * * 3", "weekly", 3), "monthly": ("5 3 15 * *", "monthly", 6),
    }


def test_sample_config_is_accepted_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from hoster_tasks.settings import DEFAULT_SNAPSHOT_SCHEDULE, Settings
    except ImportError as exc:
        pytest.skip(f"hoster_tasks.settings not importable: {exc}")
    for key in list(os.environ):
        if key.startswith("HOSTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOSTER_CONFIG", str(OPS / "config.sample.toml"))
    settings = Settings.from_env()
    assert settings.snapshot_schedule == DEFAULT_SNAPSHOT_SCHEDULE
    assert settings.targets[0].target_dataset("zroot/vm-encrypted/vm1") == "backup/vm-encrypted/vm1"


# -- systemd ----------------------------------------------------------------------------------------

def _unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (OPS / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units(name: str) -> None:
    unit = _unit(name)
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start.split()[1] == name.removeprefix("hoster-tasks-").removesuffix(".service")
    assert unit["Service.EnvironmentFile"] == ["/etc/hoster-tasks/env"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def _seconds(span: str) -> float:
    units = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u or "s"] for n, u in re.findall(r"(\d+)\s*(min|s|m|h|d)?", span))


def test_worker_unit_waits_for_running_replications() -> None:
    unit = _unit("hoster-tasks-worker.service")
    assert _seconds(unit["Service.TimeoutStopSec"][0]) >= 3600
    assert unit["Service.KillMode"] == ["mixed"]  # SIGTERM to Celery only, not to the zfs pipelines
    assert "--soft-shutdown-timeout" not in unit["Service.ExecStart"][0]


def test_metrics_timer_writes_the_configured_textfile() -> None:
    unit = _unit("hoster-tasks-metrics.service")
    assert unit["Service.ExecStart"][0].endswith(f"metrics --textfile {_sample()['metrics_textfile']}")
    assert (OPS / "systemd" / "hoster-tasks-metrics.timer").exists()


def test_systemd_analyze_verify() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not available")
    files = sorted(str(p) for p in (OPS / "systemd").iterdir() if p.suffix in (".service", ".timer"))
    res = _run(["systemd-analyze", "verify", *files])
    # The binary is not installed here; anything else is a real problem.
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if line.strip() and "/opt/hoster-tasks/bin/hoster-tasks is not executable" not in line]
    assert not problems, "\n".join(problems)


# -- FreeBSD rc.d -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RC_SCRIPTS)
def test_rc_scripts_are_valid_sh_and_proper_rc_d(name: str) -> None:
    path = OPS / "rc.d" / name
    assert path.stat().st_mode & stat.S_IXUSR
    res = _run(["sh", "-n", str(path)])
    assert res.returncode == 0, res.stderr
    text = path.read_text()
    assert re.search(rf"^# PROVIDE: {name}$", text, re.M)
    assert re.search(r"^# REQUIRE: .*\bLOGIN\b", text, re.M)
    assert f'rcvar="{name}_enable"' in text
    assert ". /etc/rc.subr" in text and 'load_rc_config "$name"' in text and 'run_rc_command "$1"' in text
    assert f'{name}_env_file:="/usr/local/etc/hoster-tasks/env"' in text


STUB_RC_SUBR = r"""
load_rc_config() { :; }
warn() { echo "WARN: $*" >&2; }
run_rc_command() {
	eval "_env_file=\$${name}_env_file"
	if [ -n "$_env_file" ] && [ -r "$_env_file" ]; then set -a; . "$_env_file"; set +a; fi
	eval "$start_precmd" || { echo "precmd failed" >&2; exit 1; }
	echo "name=$name"
	echo "rcvar=$rcvar"
	echo "command=$command"
	echo "pidfile=$pidfile"
	echo "command_args=$command_args"
	echo "HOSTER_CONFIG=$HOSTER_CONFIG"
	echo "MARKER=$MARKER"
}
"""


@pytest.mark.parametrize("name", RC_SCRIPTS)
def test_rc_scripts_start_daemon_supervised(name: str, tmp_path: Path) -> None:
    """Run each script against a stub rc.subr: the daemon(8) command line, the env file, the precmd."""
    stub = tmp_path / "rc.subr"
    stub.write_text(STUB_RC_SUBR)
    script = tmp_path / name
    script.write_text((OPS / "rc.d" / name).read_text().replace(". /etc/rc.subr", f". {stub}"))
    env_file = tmp_path / "env"
    env_file.write_text(f"HOSTER_CONFIG={tmp_path}/config.toml\nMARKER=from-env-file\n")
    user = _run(["id", "-un"]).stdout.strip()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           f"{name}_env_file": str(env_file),
           f"{name}_logfile": str(tmp_path / "log" / f"{name}.log"),
           f"{name}_chdir": str(tmp_path / "db"),
           f"{name}_runas": user}
    res = _run(["sh", str(script), "start"], env=env)
    assert res.returncode == 0, res.stderr
    out = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert out["name"] == name and out["rcvar"] == f"{name}_enable"
    assert out["command"] == "/usr/sbin/daemon"
    args = out["command_args"].split()
    assert args[args.index("-P") + 1] == out["pidfile"] == f"/var/run/{name}.pid"
    assert "-r" in args
    assert args[args.index("-o") + 1] == env[f"{name}_logfile"]
    i = args.index("/opt/hoster-tasks/bin/hoster-tasks")
    assert args[i + 1] == name.removeprefix("hoster_tasks_")
    assert out["HOSTER_CONFIG"] == f"{tmp_path}/config.toml"  # the env file wins over the default
    assert out["MARKER"] == "from-env-file"
    assert (tmp_path / "log").is_dir()
    if name != "hoster_tasks_worker":
        assert args[args.index("-u") + 1] == user
    if name != "hoster_tasks_flower":
        assert (tmp_path / "db").is_dir()


# -- the operations guide ---------------------------------------------------------------------------

def test_operations_guide_covers_the_procedures(yaml: ModuleType) -> None:
    text = (OPS / "OPERATIONS.md").read_text()
    for needle in ("ssh-keyscan", "known_hosts", "root_map", "rediss://", "FLOWER_BASIC_AUTH",
                   "POST", "/api/task/send-task/hoster.snapshot.take", '"queue": "hoster.node.',
                   "HOSTER_SENTRY_DSN", "ERROR_", "diverged", "redbeat", "rc.d", "systemctl"):
        assert needle in text, needle
    for rule in _rules(yaml):
        assert rule["alert"] in text, f"alert {rule['alert']} not explained"
    assert set(re.findall(r"hoster\.(?:snapshot|replication)\.\w+", text)) <= PUBLIC_TASKS
    payloads = re.findall(r"-d '(\{.*?\})'", text)
    assert payloads
    control = {m for m in re.findall(r"send-task/([\w.]+) [^\n]*\n[^\n]*-d '(\{.*?\})'", text) if m[0] in CONTROL_TASKS}
    for payload in payloads:
        body = json.loads(payload)
        to_control = any(payload == sent for _, sent in control)  # a control task's call goes to hoster.control
        assert set(body) <= {"args", "kwargs", "queue"}
        assert body["queue"] == "hoster.control" if to_control else body["queue"].startswith("hoster.node."), body

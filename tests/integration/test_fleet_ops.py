"""Operating a fleet through the real parts (zfs-fuse, Redis, sshd in namespaces, real workers, the real CLI):
retrying failed replications (`vm failed`, `vm retry --failed`, the public task by name), the node lifecycle
(`node list`, `node forget`) and `config check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery.result import AsyncResult
from harness import zfs as hz
from harness.proc import HarnessError, wait_until
from scenario import VMS_ROOT, make_vms, node_env, two_nodes

from hoster_tasks import __version__, keys


def _error_files(worker) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {p.name: p.read_text() for p in sorted((worker.log_path.parent / "errors").glob("ERROR_*"))}


def _diverge(pdst, vm: str) -> None:  # type: ignore[no-untyped-def]
    """The target's copy has a history of its own: every replication of `vm` fails as diverged (Permanent)."""
    hz.create_dataset(pdst.ds(f"{VMS_ROOT}/{vm}"))
    hz.snapshot(pdst.ds(f"{VMS_ROOT}/{vm}"), "custom_2099-01-01_00-00-00")


def _undiverge(pdst, vm: str) -> None:  # type: ignore[no-untyped-def]
    """The cause fixed: the foreign copy goes. zfs-fuse may call a just-listed dataset busy for a moment."""
    def destroyed() -> bool:
        try:
            hz.destroy(pdst.ds(f"{VMS_ROOT}/{vm}"), recursive=True)
        except HarnessError as exc:
            if "busy" not in str(exc):
                raise
            return False
        return True

    wait_until(destroyed, 30, f"the diverged copy of {vm} to be destroyed")


def _json(res) -> Any:  # type: ignore[no-untyped-def]
    assert res.stdout, res.stderr
    return json.loads(res.stdout)


def _error_metric(metrics: str, dataset: str) -> str:
    lines = [ln for ln in metrics.splitlines()
             if ln.startswith("hoster_tasks_replication_error{") and f'dataset="{dataset}"' in ln]
    assert len(lines) == 1, lines
    return lines[0].rsplit(" ", 1)[1]


# -- 3. retrying failed replications -------------------------------------------------------------------------------


def test_failed_replications_are_listed_retried_and_cleared_job_by_job(
    node_factory, pool_factory, worker_factory, cli, app, redis_server
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory, vms=("vm1", "vm2", "vm3"))
    vm2, vm3 = psrc.ds(f"{VMS_ROOT}/vm2"), psrc.ds(f"{VMS_ROOT}/vm3")
    for name in ("vm1", "vm2", "vm3"):
        assert cli("snapshot", "new", name).returncode == 0
    _diverge(pdst, "vm2")
    _diverge(pdst, "vm3")
    # the nightly job fails vm2 and vm3 (ERROR_nightly); a manual run of vm2 fails too (ERROR_to_dst)
    assert cli("vm", "replicate-all", "--endpoint", dst.name, "--script-name", "nightly").returncode == 1
    assert cli("vm", "replicate", "vm2", "--endpoint", dst.name).returncode == 1
    files = _error_files(worker)
    assert set(files) == {"ERROR_nightly", f"ERROR_to_{dst.name}"}
    assert sorted(ln.split(":")[0] for ln in files["ERROR_nightly"].splitlines()) == [vm2, vm3]

    listed = _json(cli("vm", "failed", "--json"))
    by_vm = {row["vm"]: row for row in listed}
    assert sorted(by_vm) == ["vm2", "vm3"]
    assert by_vm["vm2"]["node"] == src.name and by_vm["vm2"]["endpoint"] == dst.name and by_vm["vm2"]["up"]
    assert by_vm["vm2"]["attempts"] == 2 and by_vm["vm3"]["attempts"] == 1
    assert by_vm["vm2"]["since"] < by_vm["vm2"]["last_failure"]  # since the first failure of the streak
    assert by_vm["vm2"]["error_files"] == ["nightly", f"to_{dst.name}"]
    assert "diverged" in by_vm["vm2"]["error"]
    table = cli("vm", "failed", "--endpoint", dst.name)
    assert table.returncode == 0 and "Failed Replications" in table.stdout and "vm3" in table.stdout
    assert _json(cli("vm", "failed", "--endpoint", "elsewhere", "--json")) == []
    assert _error_metric(cli("metrics").stdout, vm2) == "1"

    # fix vm2's cause only, and retry it only: its lines go from both jobs' files; vm3's line stays
    _undiverge(pdst, "vm2")
    res = cli("vm", "retry", "--failed", "--vm", "vm2", "--json")
    assert res.returncode == 0, res.stderr
    assert [(r["vm"], r["outcome"]) for r in _json(res)] == [("vm2", "replicated")]
    files = _error_files(worker)
    assert list(files) == ["ERROR_nightly"]
    assert [ln.split(":")[0] for ln in files["ERROR_nightly"].splitlines()] == [vm3]
    assert [r["vm"] for r in _json(cli("vm", "failed", "--json"))] == ["vm3"]
    assert _error_metric(cli("metrics").stdout, vm2) == "0"
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    vm2_state = client.hgetall(keys.replication_state(src.name, vm2, dst.name))
    assert vm2_state["error"] == "0" and not any(f.startswith("errorfile:") for f in vm2_state)
    assert "failing_since" not in vm2_state and "attempts" not in vm2_state

    # vm3 still fails: a retry through the CLI says so and exits non-zero
    res = cli("vm", "retry", "--failed", "--json")
    assert res.returncode == 1 and [(r["vm"], r["outcome"]) for r in _json(res)] == [("vm3", "failed")]
    assert "diverged" in _json(res)[0]["error"]
    assert _json(cli("vm", "failed", "--json"))[0]["attempts"] == 2

    # fixed, and retried as Flower's API or another system does: the public task, by name, on the control queue
    _undiverge(pdst, "vm3")
    sent = app.send_task("hoster.replication.retry_failed", kwargs={"endpoint": dst.name},
                         queue=keys.CONTROL_QUEUE).get(timeout=60)
    assert [(r["vm"], r["node"]) for r in sent["queued"]] == [("vm3", src.name)] and sent["skipped"] == []
    assert AsyncResult(sent["queued"][0]["task_id"], app=app).get(timeout=90)["action"] == "full"
    assert _error_files(worker) == {}  # no failure left in the nightly job: its file is gone
    assert _json(cli("vm", "failed", "--json")) == []
    assert _json(cli("vm", "retry", "--failed", "--json")) == []


# -- 4. node lifecycle -----------------------------------------------------------------------------------------------


def test_node_list_shows_the_fleet_and_forget_removes_a_retired_node_only_once_it_is_down(
    node_factory, pool_factory, worker_factory, cli, redis_server
):
    src, dst, psrc, pdst, worker = two_nodes(node_factory, pool_factory, worker_factory)
    vm1 = psrc.ds(f"{VMS_ROOT}/vm1")
    assert cli("snapshot", "new", "vm1").returncode == 0
    assert cli("vm", "replicate", "vm1", "--endpoint", dst.name).returncode == 0

    [row] = _json(cli("node", "list", "--json"))
    assert row["node"] == src.name and row["up"] and row["vms"] == 1 and row["copies"] == 0
    assert row["targets"] == [dst.name] and row["version"] == __version__
    table = cli("node", "list")
    assert table.returncode == 0 and "Hoster Nodes" in table.stdout and __version__ in table.stdout

    refused = cli("node", "forget", src.name)
    assert refused.returncode == 1 and "is up" in refused.stderr, refused.stderr
    assert f'node="{src.name}"' in cli("metrics").stdout

    worker.stop()
    wait_until(lambda: not _json(cli("node", "list", "--json"))[0]["up"], 30, "the node to show down")
    [down] = _json(cli("node", "list", "--json"))
    assert down["last_seen"] >= row["last_seen"]  # kept after the node key expired
    assert "NO" in cli("node", "list").stdout

    res = cli("node", "forget", src.name, "--json")
    assert res.returncode == 0, res.stderr
    assert _json(res)["removed_keys"] >= 3  # the indexes and the state hashes
    assert _json(cli("node", "list", "--json")) == []
    assert f'node="{src.name}"' not in cli("metrics").stdout
    client = redis_lib.Redis.from_url(redis_server.url)
    for key in (keys.dataset_state(src.name, vm1), keys.replication_state(src.name, vm1, dst.name),
                *keys.node_keys(src.name)):
        assert not client.exists(key), key
    assert not client.sismember(keys.NODES_SET, src.name)
    again = cli("node", "forget", src.name)
    assert again.returncode == 1 and "unknown node" in again.stderr


# -- 6. config check ------------------------------------------------------------------------------------------------


def _config_env(src, dst, psrc, pdst, tmp_path: Path, **target: Any) -> dict[str, str]:  # type: ignore[no-untyped-def]
    endpoint = dst.endpoint(root_map={psrc.ds(VMS_ROOT): pdst.ds(VMS_ROOT)}, connect_timeout=3, **target)
    env = node_env(psrc, HOSTER_TARGETS=[endpoint], HOSTER_NODE_NAME=src.name,
                   HOSTER_ERROR_DIR=str(tmp_path / "errors"))
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in env.items()}


def _results(res) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {c["check"]: c["result"] for c in _json(res)}


def test_config_check_says_what_works_and_what_does_not(node_factory, pool_factory, cli, tmp_path, redis_server):
    src, dst = node_factory("src"), node_factory("dst")
    psrc, pdst = pool_factory(), pool_factory()
    make_vms(psrc, "vm1")
    pdst.create_dataset(VMS_ROOT)
    good = _config_env(src, dst, psrc, pdst, tmp_path)

    res = cli("config", "check", "--json", env=good)
    assert res.returncode == 0, res.stdout
    assert _results(res) == {name: "ok" for name in (
        "environment", "settings", "redis", "error dir", "zfs (this node)", "datasets (this node)",
        f"ssh {dst.name}", f"zfs on {dst.name}", f"roots on {dst.name}")}
    table = cli("config", "check", env=good)
    assert table.returncode == 0 and "Hoster Config Check" in table.stdout
    assert sum(1 for ln in table.stdout.splitlines() if ln.startswith("│ ") and " ok " in ln) == 9

    # a target whose host key is not known: refused (strict), its ZFS not tried; the rest still checked
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    res = cli("config", "check", "--json", env=_config_env(src, dst, psrc, pdst, tmp_path, known_hosts=str(empty)))
    assert res.returncode == 1
    results = _results(res)
    assert results[f"ssh {dst.name}"] == "FAIL" and results[f"zfs on {dst.name}"] == "skipped"
    assert results["redis"] == "ok" and results["zfs (this node)"] == "ok"
    assert "Host key verification failed" in next(c["detail"] for c in _json(res) if c["check"] == f"ssh {dst.name}")

    # a target root that does not exist there
    missing = _config_env(src, dst, psrc, pdst, tmp_path)
    missing["HOSTER_TARGETS"] = missing["HOSTER_TARGETS"].replace(pdst.ds(VMS_ROOT), pdst.ds("nothing/here"))
    res = cli("config", "check", "--json", env=missing)
    assert res.returncode == 1 and _results(res)[f"roots on {dst.name}"] == "FAIL"

    # Redis down
    res = cli("config", "check", "--json", env={**good, "HOSTER_REDIS_URL": "redis://:pw@127.0.0.1:1/0"})
    assert res.returncode == 1
    results = _results(res)
    assert results["redis"] == "FAIL" and results[f"ssh {dst.name}"] == "ok"
    assert "pw@" not in res.stdout

    # invalid settings, a misspelt variable and a settings file with an unknown key: each its own line
    res = cli("config", "check", "--json", env={**good, "HOSTER_LOCK_LEASE_SECONDS": "-1", "HOSTER_HEARTBEAT": "5"})
    assert res.returncode == 1
    assert _results(res) == {"environment": "FAIL", "settings": "FAIL"}
    assert "HOSTER_HEARTBEAT" in res.stdout and "lock_lease_seconds" in res.stdout
    toml = tmp_path / "hoster.toml"
    toml.write_text('lock_wait_secs = 3\n')
    res = cli("config", "check", env={**good, "HOSTER_CONFIG": str(toml)})
    assert res.returncode == 1 and "lock_wait_secs" in res.stdout and "FAIL" in res.stdout

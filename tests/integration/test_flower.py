"""Flower through the real parts: `hoster-tasks flower` against the test Redis, real workers with events on,
its HTTP API behind basic auth, task progress events, and its tasks page in a headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import zfs as hz
from harness.proc import free_port, stop_process, tail, wait_until
from scenario import PROJECT_ROOT, VMS_ROOT, snapshot_names, two_nodes

USER, PASSWORD = "ops", "fl0wer-pw"
BROKEN_STDERR = "dataset does not exist"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "artifacts"


@dataclass
class Flower:
    base: str
    port: int
    log: Path

    def get(self, path: str, auth: Any = (USER, PASSWORD), **kw: Any) -> requests.Response:
        return requests.get(self.base + path, auth=auth, timeout=10, **kw)

    def post(self, path: str, auth: Any = (USER, PASSWORD), **kw: Any) -> requests.Response:
        return requests.post(self.base + path, auth=auth, timeout=10, **kw)

    def tasks(self) -> dict[str, dict[str, Any]]:
        res = self.get("/api/tasks")
        res.raise_for_status()
        return dict(res.json())

    def wait_task(self, what: str, pred: Any, timeout: float = 20) -> dict[str, Any]:
        """The first task (with its uuid) in /api/tasks matching `pred`."""
        def find() -> dict[str, Any] | None:
            for uuid, info in self.tasks().items():
                if pred(info):
                    return {"uuid": uuid, **info}
            return None

        return wait_until(find, timeout, what, interval=0.3,
                          on_timeout=lambda: f"tasks: {self.tasks()}\nflower log:\n{tail(self.log)}")


@pytest.fixture
def flower(redis_server, tmp_path) -> Iterator[Flower]:  # type: ignore[no-untyped-def]
    """The real `hoster-tasks flower`, in the root namespace, on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "FLOWER_", "SENTRY_"))}
    # this tree's package, whatever checkout `pip install -e` points at (Flower runs in tmp_path, not here)
    env.update(HOSTER_REDIS_URL=redis_server.url, PYTHONUNBUFFERED="1", PYTHONPATH=str(PROJECT_ROOT))
    log = tmp_path / "flower.log"
    argv = [sys.executable, "-m", "hoster_tasks", "flower", "--port", str(port), "--address", "127.0.0.1",
            "--basic-auth", f"{USER}:{PASSWORD}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    flower = Flower(f"http://127.0.0.1:{port}", port, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited {proc.returncode}:\n{tail(log)}")
        try:
            return requests.get(flower.base + "/healthcheck", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, 30, "flower to answer /healthcheck", interval=0.2, on_timeout=lambda: tail(log))
        # Flower learns of tasks from worker events only once its event receiver is connected
        wait_until(lambda: "Connected to redis" in log.read_text() or "event" in log.read_text().lower(), 10,
                   "flower's broker connection", interval=0.2, on_timeout=lambda: tail(log))
        yield flower
    finally:
        stop_process(proc, timeout=10, group=True)


def test_flower_api_shows_tasks_refuses_strangers_and_sends_tasks(
    flower, node_factory, pool_factory, worker_factory, cli
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    assert cli("snapshot", "new", "vm1").returncode == 0
    res = cli("vm", "replicate", "vm1", "--endpoint", "broken")
    assert res.returncode == 1

    snap = flower.wait_task("a successful snapshot task",
                            lambda t: t.get("name") == "hoster.snapshot.take" and t.get("state") == "SUCCESS")
    assert "vm1" in snap["args"] and "custom" in snap["args"]  # readable arguments
    assert vm in snap["result"]
    failed = flower.wait_task("the failed replication link",
                              lambda t: t.get("name") == "hoster.replication.step" and t.get("state") == "FAILURE")
    assert failed["name"] == "hoster.replication.step" and vm in failed["args"] and "broken" in failed["args"]
    assert "DatasetNotFound" in failed["exception"] and "dataset does not exist" in failed["exception"]
    assert failed["worker"].startswith("src@")
    info = flower.get(f"/api/task/info/{failed['uuid']}").json()
    assert info["state"] == "FAILURE" and info["name"] == "hoster.replication.step"
    # the request itself (replaced by its chain) ends as FAILURE too, not STARTED forever
    flower.wait_task("the replicate request to end failed", lambda t: t.get("name") == "hoster.replication.replicate"
                     and t.get("state") == "FAILURE")

    # no credentials, or wrong ones: the API and the UI are refused; only the health check is open
    for auth in (None, (USER, "wrong"), ("nobody", PASSWORD)):
        assert flower.get("/api/tasks", auth=auth).status_code == 401
        assert flower.get("/api/workers", auth=auth).status_code == 401
        assert flower.get("/tasks", auth=auth).status_code == 401
        assert flower.post("/api/task/send-task/hoster.snapshot.take", auth=auth,
                           json={"args": ["vm1", "custom", None], "queue": "hoster.node.src"}).status_code == 401
    assert len(snapshot_names(vm)) == 1  # the refused send did nothing
    assert flower.get("/healthcheck", auth=None).status_code == 200

    # triggering from another system: send-task by name onto the node's queue
    sent = flower.post("/api/task/send-task/hoster.snapshot.take",
                       json={"args": ["vm1", "custom", None], "queue": "hoster.node.src"})
    assert sent.status_code == 200, sent.text
    task_id = sent.json()["task-id"]
    wait_until(lambda: len(snapshot_names(vm)) == 2, 30, "the snapshot sent through Flower")
    done = flower.wait_task("the sent task to succeed", lambda t: t.get("uuid") == task_id
                            and t.get("state") == "SUCCESS")
    assert done["result"] and snapshot_names(vm)[-1] in done["result"]


def test_flower_shows_progress_of_a_slow_transfer(flower, node_factory, pool_factory, worker_factory, cli):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True)
    vm = psrc.ds(f"{VMS_ROOT}/vm1")
    hz.write_random(vm, 16)
    assert cli("snapshot", "new", "vm1").returncode == 0

    seen: dict[str, set[str]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                for uuid, t in flower.tasks().items():
                    if t.get("name") == "hoster.replication.step":
                        seen.setdefault(uuid, set()).add(str(t.get("state")))
            except requests.RequestException:
                pass
            time.sleep(0.25)

    watcher = threading.Thread(target=watch)
    watcher.start()

    try:
        res = cli("vm", "replicate", "vm1", "--endpoint", "dst", "--speed-limit", "2", timeout=120)
    finally:
        time.sleep(1)
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stderr
    assert any("PROGRESS" in states for states in seen.values()), seen
    assert any("SUCCESS" in states for states in seen.values()), seen
    assert hz.exists(pdst.ds(f"{VMS_ROOT}/vm1"))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no /usr/bin/chromium")
def test_flower_tasks_page_in_headless_chromium(
    flower, node_factory, pool_factory, worker_factory, cli, tmp_path
):
    src, dst, psrc, pdst, _ = two_nodes(node_factory, pool_factory, worker_factory, broken_target=True)
    assert cli("snapshot", "new", "vm1").returncode == 0
    assert cli("vm", "replicate", "vm1", "--endpoint", "broken").returncode == 1
    failed = flower.wait_task("the failed replication link",
                              lambda t: t.get("name") == "hoster.replication.step" and t.get("state") == "FAILURE")

    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{flower.port}/tasks"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "flower-tasks.png"
    screenshot.unlink(missing_ok=True)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--window-size=1600,1000", "--virtual-time-budget=8000"]
    dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'chromium-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = subprocess.run([*base, f"--user-data-dir={tmp_path / 'chromium-shot'}", f"--screenshot={screenshot}",
                           url], capture_output=True, text=True, timeout=60)
    assert shot.returncode == 0, shot.stderr[-2000:]

    html = dom.stdout
    assert 'id="tasks-table"' in html, html[:2000]
    assert failed["uuid"] in html, html[-3000:]
    assert "FAILURE" in html and "hoster.replication.step" in html
    # the failed row names its VM and endpoint, and says what failed, without opening the task
    row = re.search(rf'<tr[^>]*\bid="{failed["uuid"]}"[^>]*>(.*?)</tr>', html, re.DOTALL)
    assert row, html[-3000:]
    cells = re.sub(r"<[^>]+>", "|", row.group(1))
    assert "vm1 → broken" in cells and psrc.ds(f"{VMS_ROOT}/vm1") in cells, cells
    assert "FAILURE" in cells and "DatasetNotFound: cannot open" in cells and BROKEN_STDERR in cells, cells
    assert "ssh -o" not in cells  # the argv is on the task's page, not in the row
    headers = re.findall(r'<th[^>]*data-column="(\w+)"', html)
    assert {"args", "kwargs", "result", "exception"} <= set(headers), headers
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, tmp_path / "flower-tasks.png")  # kept next to the test's other output too

#!/usr/bin/env python3
"""Queue latency, worker memory and Redis memory of hoster-tasks, measured on the real parts.

    python bench/queue_latency.py [--tasks 1000] [--beat-ticks 2] [--day-vms 20] [--day-hours 24] [--json PATH]

With the integration harness (tests/harness): a private redis-server, one zfs-fuse pool, two nodes `q1` and `q2`
(each a real `python -m hoster_tasks worker`, -c 4, in the root namespace, with its own VM root) and the
timing probes of bench/trace/sitecustomize.py in the workers (every local command with its task id and start
time). Then:

1. idle latency     one `hoster.snapshot.list` at a time (a Client's send_task), `--idle` times: send -> the
                    task's first ZFS command starting on the worker;
2. queued latency   `--tasks` (1,000) of them sent as fast as the client can, half to each node, then waited
                    for: the same send -> first ZFS command, p50 and p99, and the time to drain the queue;
3. beat latency     a real `hoster-tasks beat` with an every-minute snapshot entry: its cron tick -> the first
                    ZFS command of each node's take_all, for `--beat-ticks` ticks;
4. worker memory    resident set (main process + pool processes) at start, after the 1,000 and after another
                    1,000;
5. Redis memory     a simulated day on q1 with `--day-vms` VMs: `--day-hours` hourly `snapshot all --keep 3`
                    runs (the real tasks), then the keyspace by pattern (keys, bytes by MEMORY USAGE, how many
                    have no TTL), and per VM and per run, to scale to 200 VMs and 5-minute replication.

Timings never pass or fail anything; every task's result is checked. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


import redis  # noqa: E402
from benchkit import LocalBed, bench_module, local_bed, on_signals_interrupt  # noqa: E402  (bench/, first on sys.path)
from harness import Worker  # noqa: E402
from harness.proc import ensure_sbin_on_path, run  # noqa: E402

_replication = bench_module("replication")  # bench/replication.py: its machine info and log lines
machine_info, say = _replication.machine_info, _replication.say

TRACE_DIR = ROOT / "bench" / "trace"


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(pct(values, 0.5) * 1000, 1), "p99_ms": round(pct(values, 0.99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1) if values else float("nan")}  # fmt: skip


def rss_kib(worker: Worker) -> int:
    """Resident memory of the worker's process group (main process and its pool processes)."""
    assert worker.proc is not None
    pgid = worker.proc.pid
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getpgid(int(p.name)) != pgid:
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total


class Trace:
    """The workers' probe file: first local command per task id, task starts by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.first_cmd: dict[str, float] = {}
        self.starts: list[tuple[float, str, str | None]] = []  # (t, task name, task id)

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            e = json.loads(line)
            if e["kind"] == "local" and e.get("task"):
                self.first_cmd[e["task"]] = min(e["t"], self.first_cmd.get(e["task"], e["t"]))
            elif e["kind"] == "task-start":
                self.starts.append((e["t"], e["what"], e.get("task")))


class Bench:
    def __init__(self, args: argparse.Namespace, bed: LocalBed) -> None:
        self.args = args
        self.workdir = workdir = bed.workdir
        self.redis_server = bed.redis_server
        self.trace = Trace(workdir / "trace.jsonl")
        self.pool = bed.pools(size="4G", prefix="hq")
        self.workers: dict[str, Worker] = {}
        self.vms: dict[str, list[str]] = {}
        for node, count in (("q1", max(args.day_vms, 3)), ("q2", 3)):
            root = self.pool.ds(node)
            run(["zfs", "create", "-o", "mountpoint=none", root])
            self.vms[node] = [f"{root}/vm{i:03d}" for i in range(count)]
            for ds in self.vms[node]:
                run(["zfs", "create", ds])
            env = {"HOSTER_DATASETS": [root], "HOSTER_TARGETS": [], "BENCH_TRACE_FILE": str(self.trace.path),
                   "PYTHONPATH": os.pathsep.join([str(TRACE_DIR), str(ROOT)])}  # fmt: skip
            self.workers[node] = bed.workers(node, env, args=["-c", "4"], netns=False)
        os.environ["HOSTER_REDIS_URL"] = bed.redis_server.url
        for key in [k for k in os.environ if k.startswith("HOSTER_") and k != "HOSTER_REDIS_URL"]:
            del os.environ[key]
        from hoster_tasks.client import Client

        self.client = Client()

    def latency(self, sent: dict[str, float], deadline: float = 600) -> list[float]:
        """send -> first ZFS command, for every task id in `sent` (waits until the trace has them all)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.trace.read()
            if all(t in self.trace.first_cmd for t in sent):
                break
            time.sleep(0.2)
        missing = [t for t in sent if t not in self.trace.first_cmd]
        if missing:
            raise RuntimeError(f"{len(missing)} tasks never ran a ZFS command (first: {missing[0]})")
        return [self.trace.first_cmd[t] - s for t, s in sent.items()]

    def send_list(self, node: str) -> tuple[str, float, Any]:
        vm = self.vms[node][0].rsplit("/", 1)[1]
        t = time.time()
        res = self.client.app.send_task("hoster.snapshot.list", args=[vm], queue=f"hoster.node.{node}")
        return res.id, t, res


def part_idle(b: Bench, out: dict[str, Any]) -> None:
    sent: dict[str, float] = {}
    for _ in range(b.args.idle):
        task_id, t, res = b.send_list("q1")
        res.get(timeout=60)
        sent[task_id] = t
    out["idle"] = summary(b.latency(sent))
    say(f"idle: {out['idle']}")


def part_queued(b: Bench, out: dict[str, Any], label: str) -> None:
    sent: dict[str, float] = {}
    results = []
    t0 = time.time()
    for i in range(b.args.tasks):
        task_id, t, res = b.send_list("q1" if i % 2 == 0 else "q2")
        sent[task_id] = t
        results.append(res)
    send_s = time.time() - t0
    for res in results:
        rows = res.get(timeout=900)
        if not isinstance(rows, list):
            raise RuntimeError(f"snapshot.list returned {rows!r}")
    drained = time.time() - t0
    out[label] = {**summary(b.latency(sent)), "send_s": round(send_s, 2), "drain_s": round(drained, 2)}
    say(f"{label}: {out[label]}")


def part_beat(b: Bench, out: dict[str, Any]) -> None:
    """A real beat firing an every-minute snapshot entry; tick (the minute) -> first ZFS command of take_all."""
    if b.args.beat_ticks < 1:
        return
    import subprocess

    log = b.workdir / "beat.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
    env.update(PYTHONUNBUFFERED="1", HOSTER_NODE_NAME="control", HOSTER_REDIS_URL=b.redis_server.url,
               HOSTER_SNAPSHOT_SCHEDULE=json.dumps({"t": {"cron": "* * * * *", "stype": "frequent", "keep": 3}}),
               PYTHONPATH=str(ROOT))  # fmt: skip
    b.trace.read()
    seen = len(b.trace.starts)
    with open(log, "ab") as fh:
        beat = subprocess.Popen([sys.executable, "-m", "hoster_tasks", "beat"], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        lat: list[float] = []
        deadline = time.monotonic() + 70 * (b.args.beat_ticks + 1)
        while time.monotonic() < deadline and len(lat) < 2 * b.args.beat_ticks:
            time.sleep(1)
            b.trace.read()
            lat = []
            for t, what, task_id in b.trace.starts[seen:]:
                if what == "hoster.snapshot.take_all" and task_id in b.trace.first_cmd:
                    tick = (int(t) // 60) * 60
                    lat.append(b.trace.first_cmd[task_id] - tick)
        out["beat"] = summary(lat)
        say(f"beat tick -> first ZFS command of each node's take_all: {out['beat']}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=30)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def pattern(key: str, pool: str) -> str:
    key = _UUID.sub("{id}", key)
    key = re.sub(re.escape(pool) + r"/q\d/vm\d+", "{vm}", key)
    key = re.sub(re.escape(pool) + r"/q\d", "{root}", key)
    return re.sub(r"\d{6,}", "{n}", key)


def census(b: Bench) -> dict[str, dict[str, Any]]:
    client = redis.Redis.from_url(b.redis_server.url)
    rows: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        row = rows.setdefault(pattern(name, b.pool.name), {"keys": 0, "bytes": 0, "no_ttl": 0, "max_ttl_s": 0})
        row["keys"] += 1
        row["bytes"] += int(client.memory_usage(key) or 0)
        ttl = client.ttl(key)
        if ttl == -1:
            row["no_ttl"] += 1
        row["max_ttl_s"] = max(row["max_ttl_s"], ttl)
    return dict(sorted(rows.items()))


def part_day(b: Bench, out: dict[str, Any]) -> None:
    before = census(b)
    client = redis.Redis.from_url(b.redis_server.url)
    mem0 = int(client.info("memory")["used_memory"])
    t0 = time.time()
    for hour in range(b.args.day_hours):
        sent = b.client.snapshot_all("hourly", 3, node="q1")
        for res in sent.values():
            r = res.get(timeout=600)
            if len(r["taken"]) != len(b.vms["q1"]):
                raise RuntimeError(f"hour {hour}: took {len(r['taken'])} of {len(b.vms['q1'])}")
    after = census(b)
    mem1 = int(client.info("memory")["used_memory"])
    grew = {p: {"keys": r["keys"] - before.get(p, {}).get("keys", 0),
                "bytes": r["bytes"] - before.get(p, {}).get("bytes", 0), "no_ttl": r["no_ttl"],
                "max_ttl_s": r["max_ttl_s"]}
            for p, r in after.items()}  # fmt: skip
    out["day"] = {"vms": len(b.vms["q1"]), "hours": b.args.day_hours, "seconds": round(time.time() - t0, 1),
                  "used_memory_before": mem0, "used_memory_after": mem1, "keys_after": after,
                  "growth": grew}  # fmt: skip
    say(f"simulated {b.args.day_hours} h of hourly snapshots on {len(b.vms['q1'])} VMs: used_memory {mem0} -> {mem1}")
    for p, r in grew.items():
        say(f"  {p:60s} +{r['keys']:6d} keys +{r['bytes']:9d} B  no TTL: {r['no_ttl']}  max TTL {r['max_ttl_s']} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000, help="tasks queued at once across the 2 workers (1000)")
    p.add_argument("--idle", type=int, default=50, help="one-at-a-time samples (50)")
    p.add_argument("--beat-ticks", type=int, default=2, help="beat ticks to wait for (2; 0 skips; ~1 min each)")
    p.add_argument("--day-vms", type=int, default=20, help="VMs on q1 for the simulated day (20)")
    p.add_argument("--day-hours", type=int, default=24, help="hourly snapshot runs in the simulated day (24)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_sbin_on_path()
    if os.geteuid() != 0 or shutil.which("zfs-fuse") is None or shutil.which("redis-server") is None:
        raise SystemExit("bench: run as root, with zfs-fuse and redis-server installed")
    out: dict[str, Any] = {"info": machine_info(), "args": vars(args) | {"json": str(args.json)}}

    on_signals_interrupt()
    failed: BaseException | None = None
    with contextlib.ExitStack() as stack:
        try:
            bed = local_bed(stack, "hoster-queuebench-")
            workdir, redis_server = bed.workdir, bed.redis_server
            b = Bench(args, bed)
            say(f"workdir {workdir}, redis {redis_server.url}, workers q1 ({len(b.vms['q1'])} VMs) and q2, -c 4")
            out["rss_kib_start"] = {n: rss_kib(w) for n, w in b.workers.items()}
            part_idle(b, out)
            part_queued(b, out, "queued")
            out["rss_kib_after_1"] = {n: rss_kib(w) for n, w in b.workers.items()}
            part_queued(b, out, "queued_again")
            out["rss_kib_after_2"] = {n: rss_kib(w) for n, w in b.workers.items()}
            say(f"worker RSS KiB: start {out['rss_kib_start']}, after {args.tasks} jobs {out['rss_kib_after_1']}, "
                f"after {2 * args.tasks} {out['rss_kib_after_2']}")  # fmt: skip
            part_beat(b, out)
            part_day(b, out)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported, then torn down
            failed = exc
            say(f"stopped: {type(exc).__name__}: {exc}")
        finally:
            out["info"]["loadavg_end"] = os.getloadavg()
            print(json.dumps({k: v for k, v in out.items() if k != "day"} | {"day": {
                k: v for k, v in out.get("day", {}).items() if k != "keys_after"}}, indent=1, default=str), flush=True)
            if args.json:
                args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            say("cleaning up")
    return 130 if isinstance(failed, KeyboardInterrupt) else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

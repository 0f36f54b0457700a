#!/usr/bin/env python3
"""Replication speed of hoster-tasks against the raw pipeline and syncoid, in one run on the same pools.

    python bench/replication.py [--mib 256] [--inc-mib 32] [--repeat 3] [--vms 30] [--json PATH]   (as root)

Builds, with the integration harness (tests/harness), a source node and a target node (network namespaces
with sshd), one zfs-fuse pool each, a private redis-server and a real hoster-tasks worker in the source node,
then times:

1. bulk         one VM with --mib MiB of random data and one snapshot, first replication to an empty target:
                raw `zfs send | ssh zfs receive -u`, syncoid, and `hoster-tasks vm replicate` (CLI wall time,
                worker-side span from the worker log, and the pipeline's own `seconds` from the result).
2. incremental  --inc-mib MiB more and a new snapshot, the incremental the same three ways.
3. in sync      --vms VMs already in sync: one `hoster-tasks vm replicate-all` pass, one `syncoid -r` pass
                over their parent, and one batched `zfs get -Hp -r guid,createtxg` over SSH (the raw cost of
                knowing that nothing needs sending).
0. fixed costs  Python start of the CLI, and one trivial Celery task round trip.

For every run it also counts, from the target's sshd log, the SSH connections opened and the remote commands
run. Every run is checked (the target's snapshot GUIDs equal the source's), but timings never pass or fail
anything. Everything started here is stopped and removed at the end, on error and on Ctrl-C too.
See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import harness.netns  # noqa: E402
from harness import Node, NodeFactory, NodeNetwork, PoolFactory, RedisServer, Worker, WorkerFactory, ZfsFuse  # noqa: E402
from harness import zfs as hz  # noqa: E402
from harness.netns import RUN_DIR  # noqa: E402
from harness.proc import HarnessError, ensure_sbin_on_path, make_private_dir, run  # noqa: E402
from harness.zfs import sweep_stale_pools, sweep_stale_state_dirs  # noqa: E402

TOOLS = ("raw", "syncoid", "hoster-tasks")
LONG = 3600.0  # subprocess timeout for anything that moves data or walks many datasets
# Debian's bash sources ~/.bashrc when sshd starts it (SSH_CLIENT set, shell level < 2). Root's .bashrc on the
# development machines runs `pyenv init`: ~0.17 s added to every remote command. With SHLVL=1 in the session
# environment bash counts itself as a nested shell and skips it. Only this bench's own sshd gets the line.
LEAN_SSHD_LINE = "SetEnv SHLVL=1\n"
_TASK_DONE = re.compile(
    r"^\[(?P<ts>[\d-]+ [\d:,]+): \w+/[\w-]+\] Task (?P<name>hoster\.[\w.]+)\[(?P<id>[0-9a-f-]+)\] succeeded in "
    r"(?P<secs>[0-9.e-]+)s"
)
_TASK_RECEIVED = re.compile(r"^\[(?P<ts>[\d-]+ [\d:,]+): \w+/MainProcess\] Task (?P<name>hoster\.[\w.]+)\[.*received$")


# -- results -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    tool: str
    seconds: list[float] = field(default_factory=list)
    conns: list[int] = field(default_factory=list)  # SSH connections accepted by the target, per run
    cmds: list[int] = field(default_factory=list)  # remote commands (sessions) the target ran, per run
    stream_bytes: int | None = None  # bytes of the zfs send stream (for MB/s)
    datasets: int | None = None  # datasets covered (for the per-dataset cost)
    note: str = ""
    baseline: bool = False  # the row the others of its scenario are compared with
    part: bool = False  # a share of another row's time (no MB/s, no ratio)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def min(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def mbps(self) -> float | None:
        if self.part or not self.stream_bytes or not self.seconds:
            return None
        return self.stream_bytes / 1e6 / self.median

    def ssh_text(self) -> str:
        if not self.cmds:
            return ""
        return f"{statistics.median(self.conns):g}/{statistics.median(self.cmds):g}"

    def as_dict(self, ratio: float | None) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "tool": self.tool, "runs_s": [round(s, 4) for s in self.seconds],
            "median_s": round(self.median, 4), "min_s": round(self.min, 4),
            "stream_bytes": self.stream_bytes, "mb_per_s": None if self.mbps is None else round(self.mbps, 1),
            "datasets": self.datasets,
            "per_dataset_ms": None if not self.datasets else round(self.median / self.datasets * 1000, 2),
            "ssh_connections": self.conns, "remote_commands": self.cmds,
            "ratio_vs_raw": None if ratio is None else round(ratio, 3), "note": self.note,
        }  # fmt: skip


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    traces: list[dict[str, Any]] = field(default_factory=list)

    def row(self, scenario: str, tool: str, **kw: Any) -> Row:
        for r in self.rows:
            if r.scenario == scenario and r.tool == tool:
                return r
        r = Row(scenario, tool, **kw)
        self.rows.append(r)
        return r

    def ratio(self, row: Row) -> float | None:
        base = next((r for r in self.rows if r.scenario == row.scenario and r.baseline and r.seconds), None)
        if base is None or not row.seconds or row.part:
            return None
        return row.median / base.median

    def table(self) -> str:
        head = ("scenario", "tool", "runs", "median s", "min s", "MB/s", "ms/dataset", "ssh conn/cmds", "x raw")
        lines = [head]
        for r in sorted(self.rows, key=lambda r: r.scenario):  # stable: tools stay in their order
            ratio = self.ratio(r)
            lines.append((
                r.scenario, r.tool, str(len(r.seconds)), f"{r.median:.3f}", f"{r.min:.3f}",
                "" if r.mbps is None else f"{r.mbps:.1f}",
                "" if not r.datasets else f"{r.median / r.datasets * 1000:.1f}",
                r.ssh_text(), "" if ratio is None else f"{ratio:.2f}",
            ))  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
            out.append("  ".join(cells).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        notes = [f"  {r.scenario} / {r.tool}: {r.note}" for r in sorted(self.rows, key=lambda r: r.scenario) if r.note]
        return "\n".join(out + (["", "rows:", *notes] if notes else []))

    def as_dict(self) -> dict[str, Any]:
        return {"info": self.info, "rows": [r.as_dict(self.ratio(r)) for r in self.rows], "traces": self.traces}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the environment ---------------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    src: Node
    dst: Node
    redis: RedisServer
    worker: Worker
    bulk_vm: str  # <src pool>/vm/bulk
    many_root: str  # <src pool>/many: holds the in-sync VMs
    many_vms: list[str]
    targets: dict[str, str]  # tool -> target dataset of the bulk VM
    many_target_root: str
    syncoid_path: Path
    trace_path: Path | None = None
    restart_worker: Callable[[dict[str, Any], int], Worker] | None = None  # a new worker with these env overrides
    endpoint: dict[str, Any] = field(default_factory=dict)  # the worker's target (HOSTER_TARGETS entry)

    # -- commands --------------------------------------------------------------------------------------
    def cli(self, *argv: str, timeout: float = LONG) -> tuple[float, subprocess.CompletedProcess[str]]:
        """The real `python -m hoster_tasks ...`, from the root namespace as an operator runs it; wall time."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
        env.update(HOSTER_REDIS_URL=self.redis.url, HOSTER_TASK_WAIT_SECONDS=str(int(timeout)))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "hoster_tasks", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout + 30, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise HarnessError(
                f"hoster-tasks {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}\n"
                f"worker log tail:\n{self.worker.log_tail(60)}"
            )
        return elapsed, proc

    def raw_pipe(self, send_argv: Sequence[str], target: str) -> float:
        """`zfs send ... | ssh root@dst zfs receive -u target`, run in the source node's namespace."""
        recv_argv = self.dst.ssh_argv("zfs", "receive", "-u", target, connect_timeout=10)
        with tempfile.TemporaryFile() as e1, tempfile.TemporaryFile() as e2:
            started = time.perf_counter()
            send = self.src.popen(send_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=e1)
            recv = self.src.popen(recv_argv, stdin=send.stdout, stdout=subprocess.DEVNULL, stderr=e2)
            assert send.stdout is not None
            send.stdout.close()  # only the receiver holds the read end
            rc_recv = recv.wait(timeout=LONG)
            rc_send = send.wait(timeout=60)
            elapsed = time.perf_counter() - started
            if rc_send or rc_recv:
                e1.seek(0)
                e2.seek(0)
                errors = f"{e1.read().decode()} {e2.read().decode()}"
                raise HarnessError(f"raw pipeline failed (send {rc_send}, receive {rc_recv}): {errors}")
        return elapsed

    def syncoid(self, source: str, target: str, *extra: str) -> tuple[float, str]:
        """syncoid from the source node's namespace, as the brief's options; wall time and its output."""
        argv = [
            str(self.syncoid_path), "--no-privilege-elevation", "--recvoptions=u", f"--sshkey={self.src.key_file}",
            f"--sshoption=UserKnownHostsFile={self.src.known_hosts}", "--sshoption=StrictHostKeyChecking=yes",
            "--no-sync-snap", *self.args.syncoid_arg, *extra, source, f"root@{self.dst.address}:{target}",
        ]  # fmt: skip
        started = time.perf_counter()
        proc = self.src.exec(argv, check=False, timeout=LONG)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise HarnessError(f"syncoid exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return elapsed, proc.stdout + proc.stderr

    # -- what the target's sshd and the worker saw -----------------------------------------------------
    def sshd_offset(self) -> int:
        return _size(self.dst.sshd_log)

    def ssh_counts(self, offset: int) -> tuple[int, int]:
        """(connections accepted, remote commands started) on the target since `offset` (sshd LogLevel VERBOSE)."""
        time.sleep(0.05)  # sshd's children log their last lines a moment after the client returns
        text = _read_from(self.dst.sshd_log, offset)
        return text.count("Accepted publickey for "), text.count("Starting session: command ")

    def worker_offset(self) -> int:
        return _size(self.worker.log_path)

    def worker_tasks(self, offset: int) -> dict[str, Any]:
        """What the worker logged since `offset`: each task's own duration, and the span from the first
        `received` to the last `succeeded` (the worker side of one request, queue hops between links included)."""
        durations: dict[str, list[float]] = {}
        first: float | None = None
        last: float | None = None
        for line in _read_from(self.worker.log_path, offset).splitlines():
            if m := _TASK_RECEIVED.match(line):
                first = first if first is not None else _log_ts(m["ts"])
            elif m := _TASK_DONE.match(line):
                durations.setdefault(m["name"], []).append(float(m["secs"]))
                last = _log_ts(m["ts"])
        span = (last - first) if first is not None and last is not None else None
        return {"durations": durations, "span": span, "first": first, "last": last}

    def trace_summary(self, since: float, label: str, report: Report) -> None:
        """With --trace: where each worker task's time went since `since` (wall clock), by kind of call."""
        if self.trace_path is None or not self.trace_path.exists():
            return
        events = [json.loads(line) for line in self.trace_path.read_text().splitlines() if line.strip()]
        events = [e for e in events if e["t"] >= since - 0.001]
        links = []
        for task in sorted((e for e in events if e["kind"] == "task"), key=lambda e: e["t"]):
            # A replaced task and the chain's last link share a task id: match by process and time window too.
            mine = [
                e for e in events
                if e["kind"] not in ("task", "task-start") and e.get("task") == task["task"]
                and e["pid"] == task["pid"] and task["t"] - 0.001 <= e["t"] <= task["t"] + task["dur"]
            ]  # fmt: skip
            kinds: dict[str, list[float]] = {}
            for e in mine:
                kinds.setdefault(e["kind"], []).append(e["dur"])
            accounted = sum(sum(v) for v in kinds.values())
            links.append({
                "task": task["what"], "seconds": round(task["dur"], 3),
                "by_kind": {k: {"n": len(v), "s": round(sum(v), 3)} for k, v in sorted(kinds.items())},
                "unaccounted_s": round(task["dur"] - accounted, 3),
                "calls": [(e["kind"], round(e["dur"], 3), e["what"]) for e in sorted(mine, key=lambda e: e["t"])],
            })  # fmt: skip
        report.traces.append({"label": label, "links": links})
        for link in links:
            kinds_txt = ", ".join(f"{k} {v['n']}x {v['s']:.2f}s" for k, v in link["by_kind"].items())
            say(f"    trace {link['task']}: {link['seconds']:.2f}s = {kinds_txt}, other {link['unaccounted_s']:.2f}s")
            if self.args.trace_calls:
                for kind, dur, what in link["calls"]:
                    say(f"      {kind:11s} {dur:6.3f}s {what}")

    def verify(self, source: str, target: str) -> None:
        """The target holds exactly the source's snapshots (same GUIDs): the run really replicated."""
        want = {s.short: s.guid for s in hz.snapshots(source)}
        got = {s.short: s.guid for s in hz.snapshots(target)}
        if want != got:
            raise HarnessError(f"{target} does not mirror {source}: source {want}, target {got}")

    def destroy(self, dataset: str, timeout: float = 30) -> None:
        """`zfs destroy -r`, after releasing hoster-tasks' holds (held snapshots are "busy"), retried briefly."""
        from hoster_tasks.zfs.ops import hold_tag

        deadline = time.monotonic() + timeout
        while hz.exists(dataset):
            proc = run(["zfs", "destroy", "-r", dataset], check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"zfs destroy -r {dataset}: {proc.stderr.strip()}")
            out = run(["zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", dataset], check=False).stdout
            for line in out.splitlines():
                name, refs = line.split("\t")
                if "@" in name and refs.isdigit() and int(refs) > 0:
                    run(["zfs", "release", hold_tag(self.dst.name), name], check=False)
            time.sleep(0.2)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _log_ts(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stream_size(argv: Sequence[str]) -> int:
    """Bytes of a `zfs send` stream (read and counted here, outside any timing)."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise HarnessError(f"{argv} exited {proc.returncode}: {err.decode(errors='replace')}")
    return total


class SnapNames:
    """Snapshot names in hoster-tasks' own format, one second apart, never reused in a run."""

    def __init__(self) -> None:
        self.t = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    def next(self, stype: str = "custom") -> str:
        from hoster_tasks.names import make_snapshot_name

        self.t += dt.timedelta(seconds=1)
        return make_snapshot_name(stype, self.t)


def rotated(items: Sequence[str], n: int) -> list[str]:
    """A different tool goes first in each repetition, so caches and warm-up favour none of them."""
    k = n % len(items)
    return list(items[k:]) + list(items[:k])


def syncoid_copy(workdir: Path) -> Path:
    """The installed syncoid, with one known bug fixed in a private copy (nothing installed is changed).

    zfs-fuse has no `zfs get -t`, so syncoid falls back to `zfs get -Hpd 1 type,guid,creation` for every
    snapshot listing. In syncoid 2.1.0 that fallback is broken for a remote host: `getsnaps` has already put
    `$sshcmd` in front of `$rhost` and `getsnapsfallback` does it again ("root@host: command not found",
    "snapshots couldn't be listed"), the regression fixed upstream in sanoid pull request #931. The copy
    drops the second prefix; a syncoid without the bug is used as it is. Production OpenZFS has `-t` and
    never takes the fallback.
    """
    installed = Path(shutil.which("syncoid") or "/usr/sbin/syncoid")
    text = installed.read_text()
    start = text.find("sub getsnapsfallback")
    end = text.find("\nsub ", start + 1)
    buggy = '$rhost = "$sshcmd $rhost";'
    if start < 0 or buggy not in text[start:end]:
        return installed
    fixed = text[:start] + text[start:end].replace(buggy, "# (bench) $rhost already carries $sshcmd here", 1)
    copy = workdir / "syncoid"
    copy.write_text(fixed + text[end:])
    copy.chmod(0o755)
    return copy


def pool_size(mib: int) -> str:
    return f"{max(4, int(mib * 1.5 / 1024) + 2)}G"


# -- setup -------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, stack: contextlib.ExitStack) -> Bench:
    """Everything the scenarios need; each piece registers its teardown on `stack` as soon as it exists."""
    ensure_sbin_on_path()
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root")
    for binary in ("zfs-fuse", "zfs", "zpool", "redis-server", "sshd", "ssh", "ip", "syncoid", "pv"):
        if shutil.which(binary) is None:
            problems.append(f"missing {binary}")
    if problems:
        raise SystemExit("bench: " + "; ".join(problems) + " (scripts/bootstrap.sh installs the packages)")

    workdir = Path(tempfile.mkdtemp(prefix="hoster-bench-"))
    stack.callback(shutil.rmtree, workdir, True)
    say(f"workdir {workdir}")

    # One zfs-fuse for the whole machine: ensure() starts one only when none runs (and then stops it at the
    # end if no pool is left); it never starts a second daemon.
    daemon = ZfsFuse(make_private_dir(RUN_DIR) / f"zfs-{os.getpid()}")
    stack.callback(daemon.close)
    daemon.ensure()
    sweep_stale_pools()  # pools of killed runs only (their owner pid is dead), never a live run's
    sweep_stale_state_dirs(RUN_DIR)

    if not args.keep_bashrc and LEAN_SSHD_LINE not in harness.netns.SSHD_CONFIG:
        harness.netns.SSHD_CONFIG += LEAN_SSHD_LINE  # this process's nodes only; the file is unchanged
    network = NodeNetwork()
    stack.callback(network.close)
    network.start()

    redis_server = RedisServer(workdir / "redis", bind=("127.0.0.1", network.gateway))
    stack.callback(redis_server.stop)
    redis_server.start()

    pools = PoolFactory(workdir / "pools", daemon.mount_root)
    stack.callback(pools.cleanup)
    nodes = NodeFactory(network)
    stack.callback(nodes.cleanup)  # nodes (and whatever runs in them) go before the pools
    workers = WorkerFactory(redis_server.url, workdir / "workers")
    stack.callback(workers.cleanup)  # workers go first of all

    data = args.mib + args.repeat * args.inc_mib
    src_pool = pools(size=pool_size(data), prefix="hb")
    dst_pool = pools(size=pool_size(3 * data), prefix="hb")
    src, dst = nodes("src"), nodes("dst")

    # The VMs exist before the worker starts, so its first heartbeat registers them (the CLI finds VMs there).
    vms_root, many_root = src_pool.ds("vm"), src_pool.ds("many")
    bulk_vm = src_pool.create_dataset("vm/bulk")
    many_vms = [src_pool.create_dataset(f"many/m{i:03d}") for i in range(1, args.vms + 1)]
    if not many_vms:
        src_pool.create_dataset("many")
    targets = {"raw": dst_pool.ds("raw/bulk"), "syncoid": dst_pool.ds("syncoid/bulk"),
               "hoster-tasks": dst_pool.ds("ht/bulk")}  # fmt: skip
    for parent in ("raw", "syncoid", "ht", "many", "syncoid-many"):
        dst_pool.create_dataset(parent)
    endpoint = dst.endpoint(root_map={vms_root: dst_pool.ds("ht"), many_root: dst_pool.ds("many")})
    # Production defaults otherwise (heartbeat 10 s: the node's inventory is not re-read every second).
    env: dict[str, Any] = {"HOSTER_DATASETS": [vms_root, many_root], "HOSTER_TARGETS": [endpoint]}
    trace_path = None
    if args.trace:  # timing probes in the worker (bench/trace/sitecustomize.py); off by default
        trace_path = workdir / "trace.jsonl"
        pythonpath = [str(Path(__file__).resolve().parent / "trace"), os.environ.get("PYTHONPATH", "")]
        env.update(PYTHONPATH=os.pathsep.join(p for p in pythonpath if p), BENCH_TRACE_FILE=str(trace_path))
    worker_args = ["-c", str(args.worker_concurrency)] if args.worker_concurrency else []
    worker = workers(src, env, args=worker_args)

    def restart_worker(overrides: dict[str, Any], concurrency: int) -> Worker:
        bench.worker.stop()
        bench.worker = workers(src, {**env, **overrides}, args=["-c", str(concurrency)])
        return bench.worker

    say(f"source {src.address} pool {src_pool.name}, target {dst.address} pool {dst_pool.name}, "
        f"redis {redis_server.url}, worker ready; remote shells {'with' if args.keep_bashrc else 'without'} "
        "root's ~/.bashrc")  # fmt: skip
    bench = Bench(args, workdir, src, dst, redis_server, worker, bulk_vm, many_root, many_vms, targets,
                  dst_pool.ds("many"), syncoid_copy(workdir), trace_path, restart_worker)  # fmt: skip
    bench.endpoint = endpoint
    return bench


# -- scenarios ---------------------------------------------------------------------------------------------
def hoster_replicate(b: Bench, report: Report, sc: str, vm: str, size: int) -> float:
    """One `hoster-tasks vm replicate`; fills the CLI, worker-span and pipeline rows; returns the wall time."""
    offset, since = b.worker_offset(), time.time()
    wall, proc = b.cli("vm", "replicate", vm, "--endpoint", b.dst.name, "--json")
    ended = time.time()
    out = json.loads(proc.stdout)
    if abs(int(out.get("bytes", 0)) - size) > 256 * 1024:
        say(f"  note: hoster-tasks reports {out.get('bytes')} bytes sent, the stream is {size}")
    tasks = b.worker_tasks(offset)
    span = tasks["span"] if tasks["span"] is not None else float("nan")
    report.row(sc, "hoster-tasks: worker span").seconds.append(span)
    report.row(sc, "hoster-tasks: pipeline only").seconds.append(float(out.get("seconds", float("nan"))))
    cli_edges(report, sc, tasks, since, ended)
    links = {k.rsplit(".", 1)[-1]: [round(x, 2) for x in v] for k, v in tasks["durations"].items()}
    say(f"  hoster-tasks: wall {wall:.2f}s, worker span {span:.2f}s, pipeline {out.get('seconds', 0):.2f}s, "
        f"tasks {links}")  # fmt: skip
    b.trace_summary(since, f"{sc}: vm replicate", report)
    return wall


def cli_edges(report: Report, sc: str, tasks: dict[str, Any], started: float, ended: float) -> None:
    """The CLI's own share: from its start to the worker receiving the first task, and from the last task's
    success to the CLI's exit (log timestamps have millisecond resolution)."""
    if tasks["first"] is None or tasks["last"] is None:
        return
    before = "Python start and imports, node lookup in Redis, task sent and received by the worker"
    after = "until the CLI saw the result (it polls every 0.5 s), printed it and exited"
    report.row(sc, "hoster-tasks: CLI before 1st task", part=True, note=before).seconds.append(tasks["first"] - started)
    report.row(sc, "hoster-tasks: CLI after last task", part=True, note=after).seconds.append(ended - tasks["last"])


def add_hoster_rows(report: Report, sc: str, size: int | None, vm_cmd: str) -> None:
    report.row(sc, "hoster-tasks: CLI", stream_bytes=size, note=f"wall time of `hoster-tasks {vm_cmd}`: a new "
               "process (Python start, Celery send, chain step|...|finish on the worker, result polled every 0.5 s)")
    report.row(sc, "hoster-tasks: worker span", stream_bytes=size,
               note="first task received -> last task succeeded, from the worker log")
    report.row(sc, "hoster-tasks: pipeline only", stream_bytes=size,
               note="the result's `seconds`: zfs send | pv | ssh zfs receive alone")  # fmt: skip


def run_tool(b: Bench, report: Report, sc: str, tool: str, send_argv: list[str], size: int) -> float:
    target = b.targets[tool]
    offset = b.sshd_offset()
    if tool == "raw":
        secs, row = b.raw_pipe(send_argv, target), report.row(sc, "raw")
    elif tool == "syncoid":
        secs, row = b.syncoid(b.bulk_vm, target)[0], report.row(sc, "syncoid")
    else:
        secs, row = hoster_replicate(b, report, sc, "bulk", size), report.row(sc, "hoster-tasks: CLI")
    conns, cmds = b.ssh_counts(offset)
    row.seconds.append(secs)
    row.conns.append(conns)
    row.cmds.append(cmds)
    b.verify(b.bulk_vm, target)
    return secs


def scenario_bulk(b: Bench, report: Report, names: SnapNames) -> None:
    args = b.args
    say(f"bulk: writing {args.mib} MiB of random data into {b.bulk_vm}")
    hz.write_random(b.bulk_vm, args.mib)
    snap = hz.snapshot(b.bulk_vm, names.next())
    size = stream_size(["zfs", "send", snap])
    say(f"bulk: {snap}, stream {size / 1e6:.1f} MB")
    sc = "1 bulk"
    report.row(sc, "raw", stream_bytes=size, baseline=True, note="zfs send | ssh zfs receive -u (OpenSSH, no pv)")
    report.row(sc, "syncoid", stream_bytes=size, note="one dataset, --no-sync-snap, syncoid's defaults otherwise")
    add_hoster_rows(report, sc, size, "vm replicate")
    for rep in range(args.repeat):
        for tool in rotated(TOOLS, rep):
            b.destroy(b.targets[tool])  # a fresh, empty target for every run
            secs = run_tool(b, report, sc, tool, ["zfs", "send", snap], size)
            say(f"  run {rep + 1}/{args.repeat} {tool}: {secs:.2f}s ({size / 1e6 / secs:.0f} MB/s)")


def scenario_incremental(b: Bench, report: Report, names: SnapNames) -> None:
    """Each repetition writes new data and takes a new snapshot; all three send that same delta."""
    args = b.args
    sc = "2 incremental"
    report.row(sc, "raw", baseline=True, note="zfs send -i | ssh zfs receive -u")
    report.row(sc, "syncoid")
    add_hoster_rows(report, sc, None, "vm replicate")
    sizes = []
    for rep in range(args.repeat):
        prev = hz.snapshots(b.bulk_vm)[-1].name
        hz.write_random(b.bulk_vm, args.inc_mib)
        snap = hz.snapshot(b.bulk_vm, names.next())
        size = stream_size(["zfs", "send", "-i", prev, snap])
        sizes.append(size)
        for tool in rotated(TOOLS, rep):
            secs = run_tool(b, report, sc, tool, ["zfs", "send", "-i", prev, snap], size)
            say(f"  run {rep + 1}/{args.repeat} {tool}: {secs:.2f}s ({size / 1e6 / secs:.0f} MB/s)")
    for r in report.rows:
        if r.scenario == sc:
            r.stream_bytes = int(statistics.median(sizes))


def prepare_many(b: Bench, names: SnapNames) -> None:
    """K VMs with a few snapshots each, copied to the target and made known to hoster-tasks (untimed)."""
    args = b.args
    # The bulk VM is done with: drop it (and its copies) so that replicate-all covers exactly the K VMs.
    for ds in [b.bulk_vm, *b.targets.values()]:
        b.destroy(ds)
    say(f"in sync: {len(b.many_vms)} VMs, {args.many_snaps} snapshots each (zfs snapshot -r), copied with local "
        "zfs send | zfs receive -u")  # fmt: skip
    snaps = [hz.snapshot(b.many_root, names.next("hourly"), recursive=True).split("@", 1)[1]
             for _ in range(args.many_snaps)]  # fmt: skip
    for vm in b.many_vms:
        target = b.many_target_root + vm[len(b.many_root) :]
        _local_pipe(["zfs", "send", f"{vm}@{snaps[0]}"], target)
        if len(snaps) > 1:
            _local_pipe(["zfs", "send", "-I", f"{vm}@{snaps[0]}", f"{vm}@{snaps[-1]}"], target)
        b.verify(vm, target)
    # One untimed pass records each VM's base (hoster-tasks:base.<target>), holds it and marks the copies: from
    # then on the VMs are in sync for hoster-tasks as they are after any earlier run.
    wall, proc = b.cli("vm", "replicate-all", "--endpoint", b.dst.name, "--json")
    out = json.loads(proc.stdout)
    say(f"in sync: first replicate-all (records bases) {wall:.2f}s, "
        f"actions {sorted({r['action'] for r in out['results']})}")  # fmt: skip


def _local_pipe(send_argv: list[str], target: str) -> None:
    send = subprocess.Popen(send_argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert send.stdout is not None
    try:
        run(["zfs", "receive", "-u", target], stdin=send.stdout, timeout=LONG)
    finally:
        send.stdout.close()
        send.wait(timeout=60)


def scenario_many(b: Bench, report: Report, names: SnapNames) -> None:
    args = b.args
    prepare_many(b, names)
    sc = "3 in sync"
    k = len(b.many_vms)
    raw = report.row(sc, "raw: ssh zfs get -r", datasets=k, baseline=True,
                     note="ssh root@dst zfs get -Hp -r guid,createtxg <target root>, a new connection, from the "
                          "source node")  # fmt: skip
    local = report.row(sc, "local zfs get -r", datasets=k, note="the same listing of the source side, no SSH")
    syncoid = report.row(sc, "syncoid -r", datasets=k,
                         note="syncoid -r --skip-parent <source root> root@dst:<target root> (syncoid's normal use for "
                              "a tree; one ssh ControlMaster, commands per dataset)")  # fmt: skip
    cli_row = report.row(sc, "hoster-tasks: CLI", datasets=k, note="wall time of `hoster-tasks vm replicate-all` "
                         "(a new process, one replicate_all task, result polled every 0.5 s)")
    worker_row = report.row(sc, "hoster-tasks: worker task", datasets=k,
                            note="the replicate_all task's own duration, from the worker log")  # fmt: skip
    before = hz.snapshot_guids(b.many_target_root, recursive=True)
    get = ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", "guid,createtxg"]
    for rep in range(args.many_repeat):
        for tool in rotated(TOOLS, rep):
            offset = b.sshd_offset()
            if tool == "raw":
                for _ in range(3):  # cheap: three samples each time
                    offset = b.sshd_offset()
                    t0 = time.perf_counter()
                    b.dst.ssh(*get, b.many_target_root, via=b.src)
                    raw.seconds.append(time.perf_counter() - t0)
                    conns, cmds = b.ssh_counts(offset)
                    raw.conns.append(conns)
                    raw.cmds.append(cmds)
                    t0 = time.perf_counter()
                    b.src.exec([*get, b.many_root])
                    local.seconds.append(time.perf_counter() - t0)
                secs = raw.seconds[-1]
            elif tool == "syncoid":
                secs, _ = b.syncoid(b.many_root, b.many_target_root, "--recursive", "--skip-parent")
                conns, cmds = b.ssh_counts(offset)
                syncoid.seconds.append(secs)
                syncoid.conns.append(conns)
                syncoid.cmds.append(cmds)
            else:
                w_offset, since = b.worker_offset(), time.time()
                secs, proc = b.cli("vm", "replicate-all", "--endpoint", b.dst.name, "--json")
                ended = time.time()
                conns, cmds = b.ssh_counts(offset)
                result = json.loads(proc.stdout)
                actions = {r["action"] for r in result["results"]}
                if actions != {"nothing"} or len(result["results"]) != k:
                    raise HarnessError(f"replicate-all on in-sync VMs did work: {actions} {result}")
                tasks = b.worker_tasks(w_offset)
                cli_row.seconds.append(secs)
                cli_row.conns.append(conns)
                cli_row.cmds.append(cmds)
                worker_row.seconds.extend(tasks["durations"].get("hoster.replication.replicate_all", []))
                cli_edges(report, sc, tasks, since, ended)
                b.trace_summary(since, f"{sc}: vm replicate-all", report)
            say(f"  run {rep + 1}/{args.many_repeat} {tool}: {secs:.2f}s ({secs / k * 1000:.0f} ms/dataset)")
    if hz.snapshot_guids(b.many_target_root, recursive=True) != before:
        raise HarnessError("a pass over in-sync VMs changed the target's snapshots")


def scenario_parallel(b: Bench, report: Report, names: SnapNames) -> None:
    """The in-sync VMs, each with --par-mib MiB changed and a new snapshot: one `replicate-all` at each
    parallelism (the target's `parallel` setting; the worker restarts with it), and in every round a
    `syncoid -r` pass sending the same delta to a copy of its own (made untimed first)."""
    args = b.args
    assert b.restart_worker is not None
    sc = "4 parallel"
    k = len(b.many_vms)
    syncoid_root = b.many_target_root.rsplit("/", 1)[0] + "/syncoid-many"
    say(f"parallel: copying the {k} VMs for syncoid (untimed)")
    for vm in b.many_vms:
        snaps = hz.snapshots(vm)
        target = syncoid_root + vm[len(b.many_root) :]
        _local_pipe(["zfs", "send", snaps[0].name], target)
        if len(snaps) > 1:
            _local_pipe(["zfs", "send", "-I", snaps[0].name, snaps[-1].name], target)
    syncoid_row = report.row(sc, "syncoid -r", datasets=k, baseline=True,
                             note=f"syncoid -r --skip-parent over the {k} VMs, each with {args.par_mib} MiB new")
    levels = [int(p) for p in args.parallel.split(",")]
    concurrency = max(4, args.worker_concurrency or 0, *levels)
    for level in levels:
        b.restart_worker({"HOSTER_TARGETS": [{**b.endpoint, "parallel": level}]}, concurrency)
        say(f"  parallel {level}: writing {args.par_mib} MiB into each of the {k} VMs, one snapshot -r")
        for vm in b.many_vms:
            hz.write_random(vm, args.par_mib)
        hz.snapshot(b.many_root, names.next("hourly"), recursive=True)
        cli_row = report.row(sc, f"hoster-tasks P={level}: CLI", datasets=k,
                             note=f"`vm replicate-all` with the target's parallel = {level} (worker -c {concurrency})")
        span_row = report.row(sc, f"hoster-tasks P={level}: worker span", datasets=k,
                              note="first task received -> last task succeeded, from the worker log")
        offset, w_offset = b.sshd_offset(), b.worker_offset()
        secs, proc = b.cli("vm", "replicate-all", "--endpoint", b.dst.name, "--json")
        conns, cmds = b.ssh_counts(offset)
        result = json.loads(proc.stdout)
        if len(result["results"]) != k or {r["action"] for r in result["results"]} != {"incremental"}:
            raise HarnessError(f"replicate-all did not send every VM's delta: {result}")
        tasks = b.worker_tasks(w_offset)
        cli_row.seconds.append(secs)
        cli_row.conns.append(conns)
        cli_row.cmds.append(cmds)
        span_row.seconds.append(tasks["span"] if tasks["span"] is not None else float("nan"))
        say(f"    hoster-tasks P={level}: {secs:.2f}s (worker span {span_row.seconds[-1]:.2f}s)")
        offset = b.sshd_offset()
        secs, _ = b.syncoid(b.many_root, syncoid_root, "--recursive", "--skip-parent")
        conns, cmds = b.ssh_counts(offset)
        syncoid_row.seconds.append(secs)
        syncoid_row.conns.append(conns)
        syncoid_row.cmds.append(cmds)
        say(f"    syncoid -r: {secs:.2f}s")
        def copies(root: str) -> dict[str, int]:  # the VMs' snapshots by relative name (not the root's own)
            return {n[len(root):]: g for n, g in hz.snapshot_guids(root, recursive=True).items()
                    if not n.startswith(root + "@")}

        want = copies(b.many_root)
        for root in (b.many_target_root, syncoid_root):
            if copies(root) != want:
                raise HarnessError(f"{root} does not mirror {b.many_root} after parallel {level}")


def scenario_floor(b: Bench, report: Report) -> None:
    """Fixed costs of the CLI path, for reading the rows above: Python start, and one Celery round trip."""
    sc = "0 fixed costs"
    vm = (b.many_vms or [b.bulk_vm])[0].rsplit("/", 1)[1]
    start = report.row(sc, "CLI start (--help)", note="python -m hoster_tasks vm replicate --help: interpreter + CLI")
    task = report.row(sc, "CLI + 1 Celery task", note="`hoster-tasks snapshot list VM`: a trivial task on the worker "
                      "and its result (no progress polling)")  # fmt: skip
    for _ in range(3):
        t0 = time.perf_counter()
        run([sys.executable, "-m", "hoster_tasks", "vm", "replicate", "--help"], cwd=ROOT)
        start.seconds.append(time.perf_counter() - t0)
        task.seconds.append(b.cli("snapshot", "list", vm, "--json")[0])


# -- main --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="bulk: MiB of random data in the VM (default 256)")
    p.add_argument("--inc-mib", type=int, default=32, help="incremental: MiB written before each new snapshot")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool in bulk and incremental (default 3)")
    p.add_argument("--vms", type=int, default=30, help="in sync: number of VMs (default 30; 0 skips it)")
    p.add_argument("--many-snaps", type=int, default=3, help="in sync: snapshots per VM (default 3)")
    p.add_argument("--many-repeat", type=int, help="in sync: passes per tool (default: --repeat)")
    p.add_argument("--only", default="bulk,incremental,many,floor",
                   help="comma list of bulk, incremental, many, parallel, floor (incremental needs bulk, parallel "
                        "needs many)")  # fmt: skip
    p.add_argument("--parallel", default="1,2,4", help="parallel: the target's parallel settings to run (1,2,4)")
    p.add_argument("--par-mib", type=int, default=2, help="parallel: MiB written into each VM per round (2)")
    p.add_argument("--keep-bashrc", action="store_true",
                   help="leave the harness's sshd as it is: remote commands then run root's ~/.bashrc (pyenv init, "
                        "~0.17 s each on the development machines)")  # fmt: skip
    p.add_argument("--worker-concurrency", type=int, default=0, help="worker -c (default: the CLI's default, 4)")
    p.add_argument("--syncoid-arg", action="append", default=[],
                   help="extra syncoid option, repeatable (e.g. --syncoid-arg=--compress=none)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--trace", action="store_true",
                   help="time every command the worker runs (bench/trace/sitecustomize.py) and print where each "
                        "task's time went; keep it off for the headline numbers")  # fmt: skip
    p.add_argument("--trace-calls", action="store_true", help="--trace, listing every call")
    args = p.parse_args(argv)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    args.trace = args.trace or args.trace_calls
    args.many_repeat = args.many_repeat or args.repeat
    if "parallel" in args.only and "many" not in args.only:
        p.error("parallel needs many (it continues from the in-sync VMs)")
    if unknown := args.only - {"bulk", "incremental", "many", "parallel", "floor"}:
        p.error(f"--only: unknown {sorted(unknown)}")
    if "incremental" in args.only and "bulk" not in args.only:
        p.error("incremental needs bulk (it continues from the bulk replication)")
    if min(args.mib, args.inc_mib, args.repeat, args.many_snaps, args.many_repeat) < 1 or args.vms < 0:
        p.error("sizes and repeats must be positive")
    return args


def machine_info() -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (proc.stdout + proc.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    others = [p for p in Path("/proc").iterdir() if p.name.isdigit() and " -m pytest" in _cmdline(p)]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "syncoid": first_line(["syncoid", "--version"]),
        "ssh": first_line(["ssh", "-V"]), "loadavg_start": os.getloadavg(),
        "concurrent_pytest_processes": len(others),
    }  # fmt: skip


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(info=machine_info())
    report.info["args"] = {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}  # fmt: skip
    if report.info["concurrent_pytest_processes"]:
        say(f"warning: {report.info['concurrent_pytest_processes']} pytest process(es) run on this machine now: "
            "they share the CPUs and the zfs-fuse daemon, so the numbers will be noisy")  # fmt: skip

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    stack = contextlib.ExitStack()
    names = SnapNames()
    started = time.monotonic()
    failed: BaseException | None = None
    bench: Bench | None = None
    try:
        bench = build(args, stack)
        b = bench
        steps: list[tuple[str, Callable[[], None]]] = [
            ("bulk", lambda: scenario_bulk(b, report, names)),
            ("incremental", lambda: scenario_incremental(b, report, names)),
            ("many", lambda: scenario_many(b, report, names) if args.vms else None),
            ("parallel", lambda: scenario_parallel(b, report, names) if args.vms else None),
            ("floor", lambda: scenario_floor(b, report)),
        ]
        for name, step in steps:
            if name in args.only:
                step()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported, then everything is torn down
        failed = exc
        say(f"stopped: {type(exc).__name__}: {exc}")
        if bench is not None and not isinstance(exc, KeyboardInterrupt):
            say(f"worker log tail:\n{bench.worker.log_tail(40)}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave pools and namespaces
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up (worker, nodes, pools, redis, network)")
        try:
            stack.close()
        except Exception as exc:  # noqa: BLE001
            say(f"cleanup problem: {exc}")
            failed = failed or exc
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report.info["loadavg_end"] = os.getloadavg()
    report.info["total_seconds"] = round(time.monotonic() - started, 1)
    if report.rows:
        print(f"\nhoster-tasks replication benchmark, {report.info['date']}, {report.info['cpus']} CPUs, "
              f"load {report.info['loadavg_start'][0]:.2f} -> {report.info['loadavg_end'][0]:.2f}, remote shells "
              f"{'with' if args.keep_bashrc else 'without'} ~/.bashrc, {report.info['total_seconds']} s in all")
        print(report.table())
    if args.json and report.rows:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        say(f"wrote {args.json}")
    if isinstance(failed, KeyboardInterrupt):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

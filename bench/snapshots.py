#!/usr/bin/env python3
"""Snapshot fan-out of hoster-tasks against the fewest ZFS commands and against sanoid, in one run.

    python bench/snapshots.py [--vms 50,200,800] [--repeat 3] [--sanoid-max-vms 200] [--json PATH]   (as root)

For each VM count it builds (with the integration harness, tests/harness) a root dataset with that many VM
datasets, each already holding `--keep` snapshots of every tool, a private redis-server and a real
`python -m hoster_tasks worker` for that root, and then times, each run taking one hourly snapshot of every
VM and pruning one:

- floor     the fewest ZFS commands this host's ZFS allows for the same result, the names known: one atomic
            multi-name `zfs snapshot` where the ZFS takes several names (OpenZFS), else `zfs snapshot -r root@s` (the VM
            set is exactly the root's children) followed by `zfs destroy root@s` (the root is not a VM); then
            the oldest snapshot of every VM destroyed, one call per dataset, 8 in parallel;
- floor + listing   the same after one recursive `zfs get` of the root, the oldest chosen from it: a real job
            cannot know which snapshot is oldest (or that the root's children are exactly the VMs) unread;
- hoster-tasks   `hoster-tasks snapshot all --stype hourly --keep K` (CLI wall time; the worker's take_all
            duration from its log);
- sanoid    `sanoid --cron` (hourly = K, recursive, process_children_only), with its clock advanced an hour
            per run (faketime) so that every run takes one and prunes one, from a private copy with its
            snapshot listing fixed for zfs-fuse (see bench/README.md).

Also the CLI's fixed costs: its start (`--help`) and a trivial round trip (`snapshot list VM`).
Every run is checked (each VM ends with exactly K of that tool's snapshots, the newest one new); timings
never pass or fail anything. Everything started here is stopped and removed at the end, on error and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


from benchkit import LocalBed, bench_module, local_bed, on_signals_interrupt, tear_down  # noqa: E402  (bench/, first on sys.path)
from harness import Worker  # noqa: E402
from harness.proc import HarnessError, ensure_sbin_on_path, run  # noqa: E402

from hoster_tasks.snapshots import RETENTION_PROPS  # noqa: E402

_replication = bench_module("replication")  # bench/replication.py: its report table, machine info, log lines
_TASK_DONE, Report, machine_info, say = (_replication._TASK_DONE, _replication.Report, _replication.machine_info,
                                         _replication.say)  # fmt: skip

TOOLS = ("floor", "hoster-tasks", "sanoid")
RUNS = ("floor", "floor + listing", "hoster-tasks", "sanoid")  # the floor's two rows take floor snapshots
LONG = 3600.0
FLOOR_PARALLEL = 8  # as many as hoster-tasks runs (snapshots.PRUNE_PARALLEL): 8 beat 4 on zfs-fuse here
SANOID_CONF = """\
[template_bench]
  frequently = 0
  hourly = {keep}
  daily = 0
  weekly = 0
  monthly = 0
  yearly = 0
  autosnap = yes
  autoprune = yes

[{root}]
  use_template = bench
  recursive = yes
  process_children_only = yes
"""


def zfs(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["zfs", *argv], check=check, timeout=LONG)


def snapshot_names(root: str, props: Sequence[str] = ("createtxg",)) -> dict[str, list[str]]:
    """{VM dataset: [snapshot names, oldest first by createtxg]} for every child of `root`, from one
    `zfs get -r` of `props` (which holds createtxg; the floor's read asks what retention reads)."""
    out = zfs("get", "-Hp", "-r", "-o", "name,property,value", ",".join(props), root).stdout
    by_ds: dict[str, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        name, prop, value = line.split("\t")
        if prop == "createtxg" and "@" in name:
            ds, short = name.split("@", 1)
            by_ds.setdefault(ds, []).append((int(value), short))
    return {ds: [s for _, s in sorted(v)] for ds, v in by_ds.items()}


def kind(short: str) -> str:
    if short.startswith("autosnap_"):
        return "sanoid"
    if short.startswith("benchfloor-"):
        return "floor"
    if short.startswith("hourly_"):
        return "hoster-tasks"
    return "other"


def sanoid_copy(workdir: Path, pool: str) -> Path:
    """The installed sanoid with its one zfs-fuse blocker fixed (nothing installed is changed): it lists
    snapshots with `zfs get -Hrpt snapshot creation` and zfs-fuse has no `-t`, so it sees none, takes one on
    every run and never prunes. Its parser keeps only snapshot lines, so `zfs get -Hrp creation` does. That
    listing covers every pool of the machine, and the other test runs' pools here are not a node's: the copy
    lists the bench's pool only (as sanoid does on a node whose only pool that is)."""
    installed = Path(shutil.which("sanoid") or "/usr/sbin/sanoid")
    text = installed.read_text()
    if "get -Hrpt snapshot creation |" not in text:
        raise HarnessError(f"{installed}: its snapshot listing is not the one this bench knows how to fix")
    fixed = text.replace("get -Hrpt snapshot creation |", f"get -Hrp creation {pool} |")
    copy = workdir / "sanoid"
    copy.write_text(fixed)
    copy.chmod(0o755)
    return copy


class Size:
    """One VM count: its root, its worker, sanoid's directories, and the counters naming each tool's runs."""

    def __init__(self, b: Bench, n: int) -> None:
        self.b = b
        self.n = n
        self.root = b.pool.ds(f"n{n}")
        self.vms: list[str] = []
        self.worker: Worker | None = None
        self.floor_runs = 0
        self.sanoid_dir = b.workdir / f"sanoid-{n}"

    def build(self) -> None:
        # Not mounted: zfs-fuse fails to mount past about a thousand filesystems ("Input/output error") and
        # then holds the ones it failed on busy until it restarts. Snapshots and destroys do not need it.
        zfs("create", "-o", "mountpoint=none", self.root)
        self.vms = [f"{self.root}/vm{i:04d}" for i in range(self.n)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda ds: zfs("create", ds), self.vms))
        keep = self.b.args.keep
        # Each tool starts from `keep` snapshots of its own per VM (taken atomically, untimed).
        seeds = [f"benchfloor-{i:05d}" for i in range(keep)]
        seeds += [f"hourly_2020-01-01_00-0{i}-00" for i in range(keep)]
        # sanoid prunes what it listed before it took the new one: after its run a VM holds keep + 1.
        seeds += [f"autosnap_2020-01-01_00:0{i}:00_hourly" for i in range(keep + 1)]
        for short in seeds:
            zfs("snapshot", "-r", f"{self.root}@{short}")
            zfs("destroy", f"{self.root}@{short}")
        self.floor_runs = keep
        for d in ("conf", "cache", "run"):
            (self.sanoid_dir / d).mkdir(parents=True, exist_ok=True)
        (self.sanoid_dir / "conf" / "sanoid.conf").write_text(SANOID_CONF.format(keep=keep, root=self.root))
        self.check()
        env = {"HOSTER_DATASETS": [self.root], "HOSTER_TARGETS": [],
               "HOSTER_LOCK_ATTEMPT_SECONDS": "30"}  # fmt: skip
        args = ["-c", str(self.b.args.worker_concurrency)]
        self.worker = self.b.workers(self.b.node_name, env, args=args, netns=False)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        zfs("destroy", "-r", self.root, check=False)  # the next count starts from a small pool

    def check(self, tool: str | None = None, before: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
        """Every VM holds exactly `keep` snapshots of every tool; after `tool` ran, its newest one is new."""
        names = snapshot_names(self.root)
        if self.root in names:
            raise HarnessError(f"the root {self.root} has snapshots: {names[self.root]}")
        keep = self.b.args.keep
        for ds in self.vms:
            mine = names.get(ds, [])
            for t in TOOLS:
                got = [s for s in mine if kind(s) == t]
                want = keep + 1 if t == "sanoid" else keep
                if len(got) != want:
                    raise HarnessError(f"{ds}: {len(got)} {t} snapshots, want {want} ({got})")
            if tool is not None and before is not None:
                old = {s for s in before.get(ds, []) if kind(s) == tool}
                new = [s for s in mine if kind(s) == tool and s not in old]
                if len(new) != 1:
                    raise HarnessError(f"{ds}: {tool} took {new}, want exactly one new snapshot")
        if len(names) != len(self.vms):
            raise HarnessError(f"snapshots on {len(names)} datasets, want {len(self.vms)}")
        return names

    # -- the tools -------------------------------------------------------------------------------------
    def floor(self, names: dict[str, list[str]], read: bool = False) -> float:
        """`read`: first one recursive listing of the root (what retention needs to know: names, order,
        holds; the very `zfs get` hoster-tasks makes) and the oldest chosen from it, not from `names`."""
        short = f"benchfloor-{self.floor_runs:05d}"
        self.floor_runs += 1
        started = time.perf_counter()
        if read:
            names = snapshot_names(self.root, RETENTION_PROPS)  # take_all's `zfs get` (no targets here)
        oldest = {ds: next(s for s in snaps if kind(s) == "floor") for ds, snaps in names.items()}
        if self.b.multi_snapshot:
            zfs("snapshot", *(f"{ds}@{short}" for ds in self.vms))
        else:
            zfs("snapshot", "-r", f"{self.root}@{short}")
            zfs("destroy", f"{self.root}@{short}")
        with ThreadPoolExecutor(FLOOR_PARALLEL) as pool:
            list(pool.map(lambda ds: zfs("destroy", f"{ds}@{oldest[ds]}"), self.vms))
        return time.perf_counter() - started

    def hoster(self, report: Report, sc: str) -> float:
        assert self.worker is not None
        offset = self.worker.log_path.stat().st_size
        wall, proc = self.b.cli("snapshot", "all", "--stype", "hourly", "--keep", str(self.b.args.keep), "--json")
        text = proc.stdout
        results = json.loads(text[text.index("{"):]) if "{" in text else {}
        if len(results.get("taken", [])) != self.n or len(results.get("destroyed", [])) != self.n:
            raise HarnessError(f"snapshot all took {len(results.get('taken', []))}, destroyed "
                               f"{len(results.get('destroyed', []))}, want {self.n} each: {text[-2000:]}")
        time.sleep(0.1)
        with open(self.worker.log_path, "rb") as fh:
            fh.seek(offset)
            for line in fh.read().decode(errors="replace").splitlines():
                m = _TASK_DONE.match(line)
                if m and m["name"] == "hoster.snapshot.take_all":
                    report.row(sc, "hoster-tasks: worker task", datasets=self.n).seconds.append(float(m["secs"]))
        return wall

    def sanoid(self) -> float:
        self.b.sanoid_hours += 1
        d = self.sanoid_dir
        argv = ["faketime", "-f", f"+{self.b.sanoid_hours}h", str(self.b.sanoid_path), f"--configdir={d / 'conf'}",
                f"--cache-dir={d / 'cache'}", f"--run-dir={d / 'run'}", "--cron", "--quiet"]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=LONG, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise HarnessError(f"sanoid exited {proc.returncode}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
        return elapsed


class Bench:
    def __init__(self, args: argparse.Namespace, bed: LocalBed, pool: Any) -> None:
        self.args = args
        self.workdir = bed.workdir
        self.pool = pool
        self.redis = bed.redis_server
        self.workers = bed.workers
        self.node_name = "benchnode"
        self.sanoid_path = sanoid_copy(self.workdir, pool.name)
        # sanoid's first timed run is `keep + 1` hours after the seeds: they are then old enough to prune.
        self.sanoid_hours = args.keep
        from hoster_tasks.zfs.probe import probe
        from hoster_tasks.zfs.shell import LocalShell

        self.multi_snapshot = probe(LocalShell()).multi_snapshot

    def cli(self, *argv: str, timeout: float = LONG) -> tuple[float, subprocess.CompletedProcess[str]]:
        """The real `python -m hoster_tasks ...` (this tree's code: cwd and PYTHONPATH), its wall time."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
        env.update(HOSTER_REDIS_URL=self.redis.url, HOSTER_TASK_WAIT_SECONDS=str(int(timeout)),
                   PYTHONPATH=str(ROOT))  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hoster_tasks", *argv], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout + 30, check=False, stdin=subprocess.DEVNULL)  # fmt: skip
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise HarnessError(f"hoster-tasks {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return elapsed, proc


def rotated(items: Sequence[str], n: int) -> list[str]:
    k = n % len(items)
    return list(items[k:]) + list(items[:k])


def scenario_size(b: Bench, report: Report, n: int) -> None:
    size = Size(b, n)
    say(f"{n} VMs: creating {size.root} with {n} VMs and {b.args.keep} snapshots of each tool per VM")
    t0 = time.perf_counter()
    size.build()
    say(f"  built in {time.perf_counter() - t0:.1f}s; worker ready")
    sc = f"{n:4d} VMs"
    how = "multi-name zfs snapshot" if b.multi_snapshot else "zfs snapshot -r root@s + zfs destroy root@s"
    report.row(sc, "floor", datasets=n, baseline=True,
               note=f"{how}; then {n} destroys, one per dataset, {FLOOR_PARALLEL} in parallel")  # fmt: skip
    report.row(sc, "floor + listing", datasets=n,
               note="the floor after one `zfs get -Hp -r guid,createtxg,userrefs` of the root, the oldest chosen "
                    "from it (retention must read what exists)")  # fmt: skip
    report.row(sc, "hoster-tasks: CLI", datasets=n, note="hoster-tasks snapshot all --stype hourly --keep K")
    report.row(sc, "hoster-tasks: worker task", datasets=n, note="take_all's own duration (worker log)")
    with_sanoid = n <= b.args.sanoid_max_vms
    if with_sanoid:
        report.row(sc, "sanoid", datasets=n, note="faketime +1h per run; sanoid --cron, recursive, children only")
    try:
        for rep in range(b.args.repeat):
            for tool in rotated(RUNS, rep):
                if tool == "sanoid" and (not with_sanoid or rep >= b.args.sanoid_repeat):
                    continue
                before = size.check()
                if tool in ("floor", "floor + listing"):
                    secs = size.floor(before, read=tool != "floor")
                elif tool == "hoster-tasks":
                    secs = size.hoster(report, sc)
                else:
                    secs = size.sanoid()
                size.check(tool.split()[0], before)
                report.row(sc, "hoster-tasks: CLI" if tool == "hoster-tasks" else tool).seconds.append(secs)
                say(f"  run {rep + 1}/{b.args.repeat} {tool}: {secs:.2f}s ({secs / n * 1000:.1f} ms/VM)")
        if n == min(b.args.vms):
            scenario_fixed(b, report, size)
    finally:
        size.stop()


def scenario_fixed(b: Bench, report: Report, size: Size) -> None:
    """The CLI's fixed costs: its start, and a trivial task's round trip (`snapshot list VM`)."""
    sc = "   0 fixed"
    vm = size.vms[0].rsplit("/", 1)[1]
    start = report.row(sc, "CLI start (--help)")
    task = report.row(sc, "CLI + 1 task (snapshot list)", note="`hoster-tasks snapshot list VM` (bar: 0.3 s)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTER_", "SENTRY_"))}
    env["PYTHONPATH"] = str(ROOT)
    for _ in range(b.args.fixed_repeat):
        t0 = time.perf_counter()
        run([sys.executable, "-m", "hoster_tasks", "snapshot", "list", "--help"], cwd=ROOT, env=env)
        start.seconds.append(time.perf_counter() - t0)
        task.seconds.append(b.cli("snapshot", "list", vm, "--json")[0])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--vms", default="50,200,800", help="comma list of VM counts (default 50,200,800)")
    p.add_argument("--keep", type=int, default=3, help="hourly snapshots kept per VM (default 3)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and VM count (default 3)")
    p.add_argument("--sanoid-max-vms", type=int, default=200,
                   help="sanoid only up to this many VMs (it grows quadratically; default 200)")  # fmt: skip
    p.add_argument("--sanoid-repeat", type=int, default=1, help="sanoid runs per VM count (default 1)")
    p.add_argument("--fixed-repeat", type=int, default=5, help="CLI fixed-cost samples (default 5)")
    p.add_argument("--worker-concurrency", type=int, default=4)
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.vms = sorted(int(v) for v in args.vms.split(",") if v.strip())
    if not args.vms or min(args.vms) < 1 or args.keep < 1 or args.repeat < 1:
        p.error("VM counts, --keep and --repeat must be positive")
    return args


def print_report(args: argparse.Namespace, report: Report, started: float) -> None:
    report.info["loadavg_end"] = os.getloadavg()
    report.info["total_seconds"] = round(time.monotonic() - started, 1)
    if not report.rows:
        return
    info = report.info
    print(f"\nhoster-tasks snapshot fan-out benchmark, {info['date']}, {info['cpus']} CPUs, load "
          f"{info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, {info['total_seconds']} s "
          "('x raw' = x floor)", flush=True)  # fmt: skip
    print(report.table(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_sbin_on_path()
    missing = [x for x in ("zfs-fuse", "zfs", "redis-server", "sanoid", "faketime") if shutil.which(x) is None]
    if os.geteuid() != 0 or missing:
        raise SystemExit(f"bench: run as root with {', '.join(missing) or 'everything'} installed")
    report = Report(info=machine_info())
    report.info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    on_signals_interrupt()
    stack = contextlib.ExitStack()
    started = time.monotonic()
    failed: BaseException | None = None
    try:
        bed = local_bed(stack, "hoster-snapbench-")
        workdir, redis_server = bed.workdir, bed.redis_server
        pool = bed.pools(size="8G", prefix="hs")
        b = Bench(args, bed, pool)
        say(f"workdir {workdir}, pool {pool.name}, redis {redis_server.url}, "
            f"{'multi-name' if b.multi_snapshot else 'no multi-name'} snapshots")  # fmt: skip
        for n in args.vms:
            scenario_size(b, report, n)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported, then everything is torn down
        failed = exc
        say(f"stopped: {type(exc).__name__}: {exc}")
    finally:
        print_report(args, report, started)  # before the cleanup: a cleanup that hangs loses nothing
        failed = failed or tear_down(stack, say, "worker, pool, redis")
    if isinstance(failed, KeyboardInterrupt):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

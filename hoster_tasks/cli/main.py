"""`hoster-tasks`: Hoster's snapshot and replication commands, run as Celery jobs.

Commands enqueue a task and wait for its result (`--no-wait` prints the task id instead). Errors are one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hoster_tasks.cli import fleet
from hoster_tasks.names import SNAPSHOT_TYPES

EXIT_ERROR = 1
EXIT_USAGE = 2


# Numbers are usage errors (exit 2), checked by the very functions the request models' fields use; the rest
# is checked by the models when the client builds the request (exit 1, the worker's own message).
def _number(parse: Callable[[str], Any], check: Callable[[Any], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _keep_value(keep: int) -> int:  # the request models' own checks, imported when a value is given
    from hoster_tasks.requests import keep_value

    return keep_value(keep)


def _speed_limit_value(mb_per_s: float) -> float:
    from hoster_tasks.requests import speed_limit_value

    return speed_limit_value(mb_per_s)


_keep = _number(int, _keep_value, "an integer")
_speed_limit = _number(float, _speed_limit_value, "a number of MB/s")


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hoster-tasks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="group", required=True)

    snap = sub.add_parser("snapshot", help="take, list and destroy VM snapshots").add_subparsers(
        dest="cmd", required=True
    )
    p = snap.add_parser("new", help="snapshot one VM")
    p.add_argument("vm")
    p.add_argument("--stype", default="custom", choices=SNAPSHOT_TYPES)
    p.add_argument("--keep", type=_keep)
    _add_wait(p)
    p = snap.add_parser("all", help="snapshot every VM on every live node, then apply retention")
    p.add_argument("--stype", required=True, choices=SNAPSHOT_TYPES)
    p.add_argument("--keep", required=True, type=_keep)
    p.add_argument("--node", help="only this node")
    _add_wait(p)
    p = snap.add_parser("list", help="snapshots of one VM")
    p.add_argument("vm")
    p.add_argument("--json", action="store_true")
    p = snap.add_parser("list-all", help="snapshots of every VM on every live node")
    p.add_argument("--json", action="store_true")
    p = snap.add_parser("destroy", help="destroy one snapshot (dataset@name)")
    p.add_argument("snapshot")
    _add_wait(p)
    p = snap.add_parser("rollback", help="roll a VM back to a snapshot: every newer snapshot is destroyed")
    p.add_argument("vm")
    p.add_argument("snapshot", help="its name, or dataset@name")
    p.add_argument("--force-stop", action="store_true", help="stop a running VM first (confirmed stopped)")
    p.add_argument("--force-start", action="store_true", help="start the VM afterwards, even if the rollback fails")
    p.add_argument("--destroy-base", action="store_true", help="allow destroying a replication base")
    p.add_argument("--keep-newer", action="store_true", help="first copy the VM as it is now into <vm>-kept-<time>")
    p.add_argument("--yes", action="store_true", help="do not ask before destroying")
    _add_wait(p)

    vm = sub.add_parser("vm", help="replication").add_subparsers(dest="cmd", required=True)
    p = vm.add_parser("replicate", help="replicate one VM to an endpoint (full, then incremental)")
    p.add_argument("vm")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--speed-limit", type=_speed_limit, help="MB/s")
    way_back = p.add_mutually_exclusive_group()  # a copy that went its own way (the old parent after a failover)
    way_back.add_argument("--discard-diverged", dest="diverged", action="store_const", const="discard",
                          help="roll the copy back to the newest common snapshot (its newer snapshots are destroyed)")
    way_back.add_argument("--keep-diverged", dest="diverged", action="store_const", const="keep",
                          help="keep the copy as <dataset>-diverged-<time>, then send in full")
    _add_wait(p)
    p = vm.add_parser("replicate-all", help="replicate every VM of the nodes that have this endpoint")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--filter", help="comma-separated VM names")
    p.add_argument("--speed-limit", type=_speed_limit, help="MB/s")
    p.add_argument("--script-name", help="names the ERROR_<name> file (as in Hoster's scripts)")
    p.add_argument("--node", help="only this node")
    _add_wait(p)
    p = vm.add_parser("change-parent", help="failover: make the copy on this node (or --node) the VM")
    p.add_argument("vm")
    p.add_argument("--node", help="the node holding the copy (default: this node)")
    p.add_argument("--start", action="store_true", help="start the VM there afterwards")
    p.add_argument("--cireset", action="store_true", help="then have Hoster reset its guest settings (vm cireset)")
    _add_wait(p)
    p = vm.add_parser("move", help="planned failover: stop, last sync, start on NODE (nothing is lost)")
    p.add_argument("vm")
    p.add_argument("--to", required=True, help="the new node (one of this VM's targets)")
    p.add_argument("--no-start", action="store_true", help="leave it stopped on the new node")
    _add_wait(p)
    p = vm.add_parser("cireset", help="have Hoster reset a VM's guest settings for its host (cloud-init, network)")
    p.add_argument("vm")
    _add_wait(p)

    fleet.add_commands(sub, vm, _add_wait)  # vm failed, vm retry, node list/forget, config check

    p = sub.add_parser("worker", help="run this node's Celery worker")
    p.add_argument("-c", "--concurrency", type=int, default=4)
    p.add_argument("-l", "--loglevel", default="INFO")
    p = sub.add_parser("beat", help="run Celery beat with the schedule from beat_schedule.py and settings")
    p.add_argument("-l", "--loglevel", default="INFO")
    p = sub.add_parser("flower", help="run Flower against the broker (auth required)")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--basic-auth", help="user:password (or FLOWER_BASIC_AUTH)")
    p = sub.add_parser("status", help="nodes, VMs, lag, running jobs, locks, last errors")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("metrics", help="print Prometheus metrics, or write a node_exporter textfile")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--textfile", help="write atomically to this path instead of stdout")
    out.add_argument("--serve", type=int, metavar="PORT", help="serve /metrics over HTTP on PORT for Prometheus")
    p.add_argument("--address", default="127.0.0.1", help="with --serve: the address to listen on")
    return parser


def _print(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else render(data))


def _wait(result: Any, args: argparse.Namespace, timeout: float) -> Any:
    if args.no_wait:
        print(result.id)
        return None
    from hoster_tasks.cli.progress import wait_with_progress

    return wait_with_progress(result, timeout)


def _summary(result: dict[str, Any]) -> str:
    lines = [f"taken: {s}" for s in result.get("taken", [])]
    lines += [f"destroyed: {s}" for s in result.get("destroyed", [])]
    lines += [f"kept (protected): {s}" for s in result.get("spared", [])]
    lines += [f"pruning deferred until its replication ends: {s}" for s in result.get("deferred", [])]
    return "\n".join(lines) or "nothing to do"


def _rollback(client: Any, args: argparse.Namespace, timeout: float) -> int:
    """Show exactly what the rollback destroys, ask (unless --yes), then run it with that list agreed."""
    from hoster_tasks.cli.progress import rollback_plan, rollback_summary

    flags = {"force_stop": args.force_stop, "force_start": args.force_start, "destroy_base": args.destroy_base,
             "keep_newer": args.keep_newer}
    plan = client.rollback(args.vm, args.snapshot, dry_run=True, **flags).get(timeout=timeout)
    print(rollback_plan(plan), file=sys.stderr)
    if plan["destroys"] and not args.yes:
        if not sys.stdin.isatty():
            print("hoster-tasks: error: not confirmed (no terminal to ask on): give --yes", file=sys.stderr)
            return EXIT_ERROR
        if input("Roll back and destroy them? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing was changed", file=sys.stderr)
            return EXIT_ERROR
    out = _wait(client.rollback(args.vm, args.snapshot, expect_destroyed=plan["destroys"], **flags), args, timeout)
    if out is not None:
        _print(out, args.json, rollback_summary)
    return 0


def _list_light(args: argparse.Namespace) -> int:
    """`snapshot list` / `list-all` without Celery or pydantic (light_client.py): the operator's quickest wait."""
    from hoster_tasks.cli.table import snapshot_table
    from hoster_tasks.light_client import LightClient, LightSettings
    from hoster_tasks.names import validate_vm

    vm = validate_vm(args.vm) if args.cmd == "list" else None  # before any connection
    client = LightClient(LightSettings.from_env())
    try:
        rows = client.list_snapshots(vm)
    finally:
        client.close()
    _print(rows, args.json, snapshot_table)
    return 0


def run(args: argparse.Namespace) -> int:  # noqa: C901 - a flat dispatch reads best here
    if args.group == "snapshot" and args.cmd in ("list", "list-all"):
        return _list_light(args)
    from hoster_tasks.settings import get_settings

    if args.group == "config":  # reports invalid settings as one of its checks: before they are loaded
        return fleet.config_check(args)
    settings = get_settings()
    if fleet.handles(args):
        return fleet.run(args, settings)
    if args.group == "worker":
        from hoster_tasks.worker import run_worker

        run_worker(args.concurrency, args.loglevel)
        return 0
    if args.group == "beat":
        from hoster_tasks.celery_app import app

        app.start(["beat", "-l", args.loglevel])
        return 0
    if args.group == "flower":
        from hoster_tasks.observability.flower import run_flower

        return run_flower(args.address, args.port, args.basic_auth)
    if args.group == "status":
        from hoster_tasks.observability.status import collect_status, render_status

        _print(collect_status(settings), args.json, render_status)
        return 0
    if args.group == "metrics":
        from hoster_tasks.observability.metrics import collect_metrics, serve_metrics, write_textfile

        if args.serve is not None:
            return serve_metrics(settings, args.address, args.serve)
        text = collect_metrics(settings)
        if args.textfile:
            write_textfile(args.textfile, text)
        else:
            sys.stdout.write(text)
        return 0

    from hoster_tasks.client import Client

    client = Client(settings)
    timeout = settings.task_wait_seconds
    if args.group == "snapshot":
        if args.cmd == "new":
            out = _wait(client.snapshot(args.vm, args.stype, args.keep), args, timeout)
            if out is not None:
                _print(out, args.json, _summary)
        elif args.cmd == "all":
            sent = client.snapshot_all(args.stype, args.keep, args.node)
            for node, res in sent.items():
                out = _wait(res, args, timeout)
                if out is not None:
                    print(f"[{node}]")
                    _print(out, args.json, _summary)
        elif args.cmd == "destroy":
            out = _wait(client.destroy(args.snapshot), args, timeout)
            if out is not None:
                _print(out, args.json, lambda o: o.get("note") or f"destroyed: {o['destroyed']}")
        elif args.cmd == "rollback":
            return _rollback(client, args, timeout)
        return 0
    if args.group == "vm":
        from hoster_tasks.cli.progress import replication_summary

        if args.cmd == "replicate":
            out = _wait(client.replicate(args.vm, args.endpoint, args.speed_limit, args.diverged), args, timeout)
            if out is not None:
                _print(out, args.json, replication_summary)
        elif args.cmd == "change-parent":
            out = _wait(client.change_parent(args.vm, args.node or settings.node_name, args.start, args.cireset),
                        args, timeout)
            if out is not None:
                _print(out, args.json, lambda o: f"{o['vm']}: parent is now {o['parent']}"
                       + (f" (was {o['previous']})" if o.get("changed") else " (already)")
                       + (f"; cireset: {o['cireset']}" if o.get("cireset") else "")
                       + ("; started" if o.get("started") else ""))
        elif args.cmd == "move":
            out = _wait(client.move(args.vm, args.to, not args.no_start), args, timeout)
            if out is not None:
                _print(out, args.json, lambda o: f"{o['vm']}: moved, parent is now {o['parent']}"
                       + ("; started" if o.get("started") else ""))
        elif args.cmd == "cireset":
            out = _wait(client.cireset(args.vm), args, timeout)
            if out is not None:
                _print(out, args.json, lambda o: str(o["cireset"]))
        else:
            # `--filter ,` names no VM: [] reaches the request model, which refuses it (it is not "every VM")
            vms = [v.strip() for v in args.filter.split(",") if v.strip()] if args.filter is not None else None
            sent = client.replicate_all(args.endpoint, vms, args.speed_limit, args.script_name, args.node)
            failed = 0
            for _node, res in sent.items():
                out = _wait(res, args, timeout)
                if out is not None:
                    _print(out, args.json, replication_summary)
                    failed += int(bool(out.get("failed")))
            return EXIT_ERROR if failed else 0
        return 0
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        print(f"hoster-tasks: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


def describe_error(exc: BaseException) -> str:
    import redis
    from kombu.exceptions import OperationalError

    from hoster_tasks.errors import HosterTasksError

    if isinstance(exc, redis.ConnectionError | OperationalError):
        from hoster_tasks.light_client import LightSettings

        url = LightSettings.from_env().redis_url  # resolved as the settings resolve it, without pydantic
        safe = url.split("@")[-1] if "@" in url else url.split("//")[-1]
        return f"cannot reach the broker (Redis at {safe}): {exc}"
    if isinstance(exc, HosterTasksError):
        return str(exc)
    from celery.exceptions import TimeoutError as CeleryTimeout

    if isinstance(exc, CeleryTimeout | TimeoutError):
        return "timed out waiting for the task (it may still be running; see `hoster-tasks status`)"
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())

"""The fleet commands: `vm failed`, `vm retry --failed`, `node list`, `node forget`, `config check`.

Kept apart from cli/main.py, which only adds them to its parser and dispatches here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the settings (pydantic) are loaded when a command runs, not for --help
    from hoster_tasks.settings import Settings

EXIT_ERROR = 1


def add_commands(
    sub: Any, vm: Any, add_wait: Callable[[argparse.ArgumentParser], None]
) -> None:
    """`sub`: the top-level subparsers; `vm`: the `vm` group's."""
    p = vm.add_parser("failed", help="every (node, VM, endpoint) whose last replication failed")
    p.add_argument("--endpoint", help="only this target (its configured name)")
    p.add_argument("--vm", help="only this VM")
    p.add_argument("--json", action="store_true")
    p = vm.add_parser("retry", help="replicate again what failed, each on its owning node, and wait")
    p.add_argument("--failed", action="store_true", required=True, help="every failed replication (see `vm failed`)")
    p.add_argument("--endpoint", help="only this target (its configured name)")
    p.add_argument("--vm", help="only this VM")
    add_wait(p)

    node = sub.add_parser("node", help="the node registry").add_subparsers(dest="cmd", required=True)
    p = node.add_parser("list", help="every node that registered: up, last seen, VMs, targets, version")
    p.add_argument("--json", action="store_true")
    p = node.add_parser("forget", help="remove a retired node's registry entry, state and metrics (not while up)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    config = sub.add_parser("config", help="settings").add_subparsers(dest="cmd", required=True)
    p = config.add_parser("check", help="validate settings and probe Redis, SSH and ZFS: one line per check")
    p.add_argument("--json", action="store_true")


def handles(args: argparse.Namespace) -> bool:
    return args.group in ("node", "config") or (args.group == "vm" and args.cmd in ("failed", "retry"))


def _print(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else render(data))


def config_check(args: argparse.Namespace) -> int:
    """Runs before (and instead of) the settings load every other command starts with: invalid settings
    are one of its lines, not its end."""
    from hoster_tasks.config_check import render_checks, run_checks

    checks = run_checks()
    _print([c.__dict__ for c in checks], args.json, render_checks)
    return EXIT_ERROR if any(c.failed for c in checks) else 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.group == "node":
        return _node(args, settings)
    from hoster_tasks.client import Client

    client = Client(settings)
    if args.cmd == "failed":
        from hoster_tasks.failed import render_failed

        _print([r.as_dict() for r in client.failed_replications(args.endpoint, args.vm)], args.json, render_failed)
        return 0
    return _retry(client, args, settings.task_wait_seconds)


def _retry(client: Any, args: argparse.Namespace, timeout: float) -> int:
    from hoster_tasks.cli.main import describe_error
    from hoster_tasks.cli.progress import wait_with_progress
    from hoster_tasks.failed import render_retries

    retries = client.retry_failed(args.endpoint, args.vm)
    if args.no_wait:
        _print([r.as_dict() for r in retries], args.json,
               lambda rows: "\n".join(r["task_id"] or f"skipped {r['vm']} to {r['endpoint']}: {r['skipped']}"
                                      for r in rows) or "no failed replications to retry")
        return EXIT_ERROR if any(r.result is None for r in retries) else 0
    rows = []
    for retry in retries:
        row = {**retry.as_dict(), "outcome": "skipped", "error": retry.skipped}
        if retry.result is not None:
            try:
                row["result"] = wait_with_progress(retry.result, timeout)
                row["outcome"], row["error"] = "replicated", None
            except Exception as exc:  # noqa: BLE001 - one failed retry must not hide the others' outcomes
                row["outcome"], row["error"] = "failed", describe_error(exc)
        rows.append(row)
    _print(rows, args.json, render_retries)
    return EXIT_ERROR if any(r["outcome"] != "replicated" for r in rows) else 0


def _node(args: argparse.Namespace, settings: Settings) -> int:
    from hoster_tasks.node_admin import forget_node, list_nodes, render_nodes
    from hoster_tasks.redis_conn import redis_client

    with redis_client(settings, socket_connect_timeout=5) as client:
        if args.cmd == "list":
            _print(list_nodes(client), args.json, render_nodes)
            return 0
        out = forget_node(client, args.name)
    _print(out, args.json, lambda o: f"forgot node {o['node']} ({o['removed_keys']} keys removed)")
    return 0


"""What the ZFS on a host supports, read from its own usage text (`zfs` with no arguments).

zfs-fuse (pool v23) lacks most of OpenZFS 2.x's features; production nodes have them. Each feature is used
where it exists and skipped (with a safe fallback) where it does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hoster_tasks.zfs.shell import Shell


@dataclass(frozen=True)
class Capabilities:
    multi_snapshot: bool = False  # zfs snapshot a@s b@s (atomic)
    holds: bool = False
    bookmarks: bool = False
    resumable: bool = False  # receive -s, send -t, receive -A
    raw_send: bool = False  # send -w
    send_estimate: bool = False  # send -nP
    list_parsable: bool = False  # list -p
    clones_property: bool = False
    receive_unmounted: bool = True  # receive -u (accepted by zfs-fuse too, though not in its usage)


OPENZFS2 = Capabilities(True, True, True, True, True, True, True, True, True)


def _flags(usage: str, command: str) -> set[str]:
    """All single-letter flags in the usage lines of `command`, e.g. `send [-DLPbcw]` -> {D, L, P, b, c, w}."""
    flags: set[str] = set()
    for line in usage.splitlines():
        stripped = line.strip()
        if not stripped.startswith(command + " "):
            continue
        for group in re.findall(r"\[-([A-Za-z]+)\]", stripped):
            flags.update(group)
        flags.update(re.findall(r"(?<![A-Za-z])-([A-Za-z])\b", stripped))
    return flags


def _has_command(usage: str, command: str) -> bool:
    return any(line.strip().startswith(command + " ") or line.strip() == command for line in usage.splitlines())


def capabilities_from_usage(usage: str) -> Capabilities:
    send, receive, listing = _flags(usage, "send"), _flags(usage, "receive"), _flags(usage, "list")
    multi = any(
        line.strip().startswith("snapshot ") and line.rstrip().endswith("...") for line in usage.splitlines()
    )
    openzfs2 = "redact" in usage or "version" in usage.split()
    return Capabilities(
        multi_snapshot=multi,
        holds=_has_command(usage, "hold"),
        bookmarks=_has_command(usage, "bookmark"),
        resumable="s" in receive and "A" in receive and "t" in send,
        raw_send="w" in send,
        send_estimate="n" in send and "P" in send,
        list_parsable="p" in listing,
        clones_property=openzfs2,
    )


def probe(shell: Shell, zfs: str = "zfs") -> Capabilities:
    result = shell.run([zfs], check=False)
    return capabilities_from_usage(result.stdout + result.stderr)

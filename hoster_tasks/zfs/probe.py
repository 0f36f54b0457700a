"""What the ZFS on a host supports, read from its own usage text (`zfs` with no arguments).

zfs-fuse (pool v23) lacks most of OpenZFS 2.x's features; production nodes have them. Each feature is used
where it exists and skipped (with a safe fallback) where it does not.

A probe that does not get usage text back (ssh failed, `zfs` not found) raises: an unknown host is never
taken for one that supports nothing, since "no raw send" would mean sending encrypted data decrypted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hoster_tasks.errors import CommandFailed, ConnectionLost, ProbeFailed, zfs_error
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
    encryption: bool = False  # native encryption (load-key): only then can a dataset be encrypted
    destroy_list: bool = False  # zfs destroy ds@a,b,c: several snapshots of a dataset in one call
    receive_props: bool = False  # receive -o prop=value: set as the dataset is created, a partial one too


OPENZFS2 = Capabilities(
    multi_snapshot=True, holds=True, bookmarks=True, resumable=True, raw_send=True, send_estimate=True,
    list_parsable=True, clones_property=True, receive_unmounted=True, encryption=True, destroy_list=True,
    receive_props=True,
)


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


def _destroy_takes_lists(usage: str) -> bool:
    """OpenZFS: `destroy [-dnpRrv] <filesystem|volume>@<snap>[%<snap>][,...]`; zfs-fuse: `destroy [-rRd]
    <snapshot>` (one snapshot per call)."""
    return any(line.strip().startswith("destroy ") and "[,...]" in line for line in usage.splitlines())


def is_usage_text(text: str) -> bool:
    """True for the usage `zfs` prints when run without a command (every implementation has these)."""
    return "usage: zfs command" in text or (_has_command(text, "send") and _has_command(text, "receive"))


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
        encryption=_has_command(usage, "load-key"),
        destroy_list=_destroy_takes_lists(usage),
        receive_props="o" in receive,
    )


def probe(shell: Shell, zfs: str = "zfs") -> Capabilities:
    """What `zfs` on the shell's host supports. Raises ConnectionLost when the host cannot be reached (a
    later run probes again) and ProbeFailed when it answers with anything but zfs usage text."""
    argv = [zfs]
    try:
        result = shell.run(argv, check=False)  # usage text comes with a non-zero exit
    except ConnectionLost:
        raise
    except CommandFailed as exc:  # e.g. LocalShell: no such program
        raise ProbeFailed(exc.argv, exc.exit_code, exc.stderr, exc.host) from None
    text = result.stdout + result.stderr
    if is_usage_text(text):
        return capabilities_from_usage(text)
    error = zfs_error(argv, result.exit_code, result.stderr or result.stdout, shell.host)
    if isinstance(error, ConnectionLost):  # ssh's exit 255 or its words for a lost connection
        raise error
    raise ProbeFailed(argv, result.exit_code, (text.strip() or "(no output)") + " (no zfs usage text)", shell.host)

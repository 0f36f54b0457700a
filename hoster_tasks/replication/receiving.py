"""Is a `zfs receive` into a dataset running? Read from the target's `ps -A -o args=` (commands.process_args).

A receive still streaming into the target (a transfer that outlived its worker's lease, or another tool's)
leaves a half-received dataset that looks diverged; the replicator treats it as busy instead. Like syncoid's
`iszfsbusy`: any command line with `zfs receive` (or `recv`) whose last argument is the dataset. That covers
the `zfs` process itself, a shell running it (`sh -c 'mbuffer | zfs receive ...'`), sudo or doas in front.
A receive with `-d` or `-e` into an ancestor counts too: it may be creating the dataset.
"""

from __future__ import annotations

import posixpath

_RECEIVE = ("receive", "recv")


def receive_in_progress(ps_output: str, target: str) -> bool:
    return any(_receives_into(line.split(), target) for line in ps_output.splitlines())


def _receives_into(words: list[str], target: str) -> bool:
    for i, word in enumerate(words[:-1]):
        if posixpath.basename(word) == "zfs" and words[i + 1] in _RECEIVE:
            return _names_target(words[i + 2:], target)
    return False


def _names_target(args: list[str], target: str) -> bool:
    if not args:
        return False
    dest = args[-1].strip("'\"")
    if dest == target:
        return True
    flags = {c for a in args[:-1] if a.startswith("-") and a != "--" for c in a[1:]}
    return bool(flags & {"d", "e"}) and target.startswith(dest + "/")

"""A scripted `Shell` (hoster_tasks/zfs/shell.py) for unit tests of the paths zfs-fuse cannot run.

A `Host` records every argv it is asked to run and answers: `zfs` alone with a usage text (OpenZFS 2.2's or
zfs-fuse's, from fixtures/), `zfs get -Hp [-r] -o name,property,value ...` from a small model of its
datasets and snapshots, anything else from `answers` (whole argv or a prefix; the longest prefix wins).
An unscripted command fails the test. A non-zero exit with check=True raises the named error, as the real
shells do (`errors.zfs_error`). `CapturedPipeline` stands in for `run_pipeline` and records both stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoster_tasks.errors import zfs_error
from hoster_tasks.replication.pipeline import PipelineResult, Stage
from hoster_tasks.settings import Endpoint
from hoster_tasks.zfs.shell import DEFAULT_TIMEOUT, Result, ssh_argv

FIXTURES = Path(__file__).parent / "fixtures"
OPENZFS_USAGE = (FIXTURES / "openzfs2_usage.txt").read_text()
ZFS_FUSE_USAGE = (FIXTURES / "zfs_fuse_usage.txt").read_text()

Answer = tuple[int, str, str]  # exit code, stdout, stderr
Reply = Answer | Callable[[list[str]], Answer]
OK: Answer = (0, "", "")


class Host:
    def __init__(self, name: str, usage: str = OPENZFS_USAGE, endpoint: Endpoint | None = None) -> None:
        self.host = name
        self.endpoint = endpoint  # set: a remote host, whose pipeline stage goes through ssh
        self.calls: list[list[str]] = []
        self.objects: dict[str, dict[str, str]] = {}  # dataset or dataset@snap -> its properties
        self.answers: dict[tuple[str, ...], Reply] = {("zfs",): (2, "", usage), ("ps",): OK}

    def dataset(self, name: str, **props: str) -> None:
        self.objects[name] = dict(props)

    def snapshot(self, full: str, guid: int, txg: int, **props: str) -> None:
        self.objects[full] = {"guid": str(guid), "createtxg": str(txg), "creation": str(1_700_000_000 + txg),
                              "userrefs": "0", **props}

    def zfs_calls(self) -> list[list[str]]:
        return [c for c in self.calls if c[:1] == ["zfs"]]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        code, out, err = self._reply(argv)
        if check and code != 0:
            raise zfs_error(argv, code, err, self.host)
        return Result(tuple(argv), code, out, err)

    def _reply(self, argv: list[str]) -> Answer:
        matches = [k for k in self.answers if tuple(argv[: len(k)]) == k and (len(k) == len(argv) or k != ("zfs",))]
        if matches:
            reply = self.answers[max(matches, key=len)]
            return reply(argv) if callable(reply) else reply
        if argv[:2] == ["zfs", "get"]:
            return self._get(argv)
        if argv[:4] == ["zfs", "list", "-H", "-o"] and argv[5] == "-r":
            return self._list(argv)
        raise AssertionError(f"[{self.host}] unscripted command: {argv}")

    def _get(self, argv: list[str]) -> Answer:
        o = argv.index("-o")
        assert argv[2:o] in (["-Hp"], ["-Hp", "-r"]) and argv[o + 1] == "name,property,value", argv
        props, names = argv[o + 2].split(","), argv[o + 3:]
        out, err = [], []
        for name in names:
            if name not in self.objects:
                err.append(f"cannot open '{name}': dataset does not exist\n")
                continue
            found = [name] + ([n for n in self.objects if n.startswith(name + "@")] if "-r" in argv else [])
            out += [f"{n}\t{p}\t{self.objects[n].get(p, '-')}\n" for n in found for p in props]
        return (1 if err else 0), "".join(out), "".join(err)

    def _list(self, argv: list[str]) -> Answer:
        """`zfs list -H -o name,prop,... -r root`: the root and every filesystem under it, values by tabs."""
        fields, root = argv[4].split(","), argv[6]
        if root not in self.objects:
            return 1, "", f"cannot open '{root}': dataset does not exist\n"
        names = [n for n in self.objects if "@" not in n and (n == root or n.startswith(root + "/"))]
        rows = ["\t".join([n, *(self.objects[n].get(f, "-") for f in fields[1:])]) for n in names]
        return 0, "".join(row + "\n" for row in rows), ""

    def process_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv) if self.endpoint is None else ssh_argv(self.endpoint, argv)

    def close(self) -> None:
        pass


@dataclass
class CapturedPipeline:
    """Records (send argv, receive argv) of each transfer instead of running it."""

    transfers: list[tuple[list[str], list[str]]] = field(default_factory=list)

    def __call__(self, send: Stage, receive: Stage, *args: Any, **kwargs: Any) -> PipelineResult:
        self.transfers.append((send.argv, receive.argv))
        return PipelineResult(4096, 0.25)

"""A test network of nodes: one Linux bridge in the root namespace, one network namespace per node.

Each node has a veth into the bridge, its own address in a random 10.77.<n>.0/24 and its own sshd
(own host key, root login with the harness's client key only). The root namespace holds the bridge
address, so Redis and other test servers bound there are reachable from every node.

Key material lives under /run/hoster-tests (not /tmp): sshd's StrictModes refuses an AuthorizedKeysFile
below a world-writable directory such as /tmp.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .proc import HarnessError, make_private_dir, pid_alive, rand_hex, run, stop_process, tail, wait_until

RUN_DIR = Path("/run/hoster-tests")
SSHD = "/usr/sbin/sshd"
_ALIAS = "htharness pid="  # bridge alias: which pytest process owns the bridge (for stale sweeps)
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")

SSHD_CONFIG = """\
Port {port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
UseDNS no
PrintMotd no
LogLevel VERBOSE
# tests (and Fabric) may open many connections at once; the default 10:30:100 drops some of them
MaxStartups 200
MaxSessions 100
Subsystem sftp internal-sftp
"""


@dataclass
class Node:
    """One simulated host: a network namespace with its own address and sshd."""

    name: str
    netns: str
    address: str
    veth: str  # host side of the veth pair, in the root namespace
    dir: Path
    key_file: Path  # the harness's client private key (logs in as root here)
    public_key_file: Path
    known_hosts: Path  # has every live node's host key
    host_key_file: Path
    port: int = 22
    sshd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def sshd_log(self) -> Path:
        return self.dir / "sshd.log"

    def ns_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`argv` wrapped to run inside this node's namespace."""
        return ["ip", "netns", "exec", self.netns, *(os.fspath(a) for a in argv)]

    def exec(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node; defaults: check=True, text output captured, 60 s timeout."""
        return run(self.ns_argv(argv), **kw)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.ns_argv(argv), **kw)

    def link_down(self) -> None:
        """Cut the node off the network (its veth goes down; the other end loses carrier)."""
        run(["ip", "link", "set", self.veth, "down"])

    def link_up(self) -> None:
        run(["ip", "link", "set", self.veth, "up"])

    def ssh_argv(self, *command: str, connect_timeout: int = 5) -> list[str]:
        """OpenSSH client argv that logs in to this node as root (from any namespace)."""
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.key_file), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "LogLevel=ERROR", "-p", str(self.port), f"root@{self.address}", *command,
        ]  # fmt: skip

    def ssh(
        self, *command: str, via: Node | None = None, connect_timeout: int = 5, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on this node over SSH, from the root namespace or from node `via`."""
        argv = self.ssh_argv(*command, connect_timeout=connect_timeout)
        return via.exec(argv, **kw) if via else run(argv, **kw)

    def endpoint(self, **overrides: Any) -> dict[str, Any]:
        """This node as a replication target entry for HOSTER_TARGETS (JSON-ready)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "host": self.address,
            "port": self.port,
            "user": "root",
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
        }
        entry.update(overrides)
        return entry


class NodeNetwork:
    """The bridge, the client key pair, known_hosts, and the nodes currently alive."""

    def __init__(self, run_dir: Path = RUN_DIR) -> None:
        self.rid = rand_hex(4)
        self.bridge = f"htbr{self.rid}"
        self.dir = run_dir / f"net-{os.getpid()}-{self.rid}"
        self.run_dir = run_dir
        self.subnet = 0  # third octet, chosen at start()
        self.nodes: dict[str, Node] = {}  # by netns name
        self._next_host = 2
        client = self.dir / "client"
        self.key_file = client / "id_ed25519"
        self.public_key_file = client / "id_ed25519.pub"
        self.known_hosts = client / "known_hosts"
        self.authorized_keys = client / "authorized_keys"

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace (the nodes' default route)."""
        return f"10.77.{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"10.77.{self.subnet}.0/24"

    def start(self) -> NodeNetwork:
        sweep_stale_networks(self.run_dir)
        make_private_dir(self.run_dir)
        make_private_dir(self.key_file.parent)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hoster-tests", "-f", str(self.key_file)])
        shutil.copyfile(self.public_key_file, self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        self._write_known_hosts()
        self.subnet = _free_subnet()
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "link", "set", self.bridge, "alias", f"{_ALIAS}{os.getpid()}"])
        run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        return self

    def close(self) -> None:
        errors = []
        for node in list(self.nodes.values()):
            try:
                self.remove_node(node)
            except (HarnessError, OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        run(["ip", "link", "del", self.bridge], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise HarnessError("network teardown failed:\n" + "\n".join(errors))

    def add_node(self, name: str) -> Node:
        if not _NODE_NAME.match(name):
            raise HarnessError(f"node name {name!r}: use A-Z a-z 0-9 _ . - (max 31, no leading - . _)")
        host = self._allocate_host()
        netns = f"ht-{name}-{self.rid}{host:02x}"
        veth = f"htv{self.rid}{host:02x}"
        node_dir = make_private_dir(self.dir / netns)
        host_key = node_dir / "ssh_host_ed25519_key"
        node = Node(
            name=name, netns=netns, address=f"10.77.{self.subnet}.{host}", veth=veth, dir=node_dir,
            key_file=self.key_file, public_key_file=self.public_key_file,
            known_hosts=self.known_hosts, host_key_file=host_key,
        )  # fmt: skip
        self.nodes[netns] = node  # registered first, so a failure below is still torn down
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", netns, "-f", str(host_key)])
        self._plumb(node)
        self._write_known_hosts()
        self._start_sshd(node)
        return node

    def remove_node(self, node: Node) -> None:
        if node.sshd is not None:
            stop_process(node.sshd, timeout=5)
            node.sshd = None
        _kill_netns_processes(node.netns)
        run(["ip", "link", "del", node.veth], check=False)
        run(["ip", "netns", "del", node.netns], check=False)
        # The address is reused later by a node with another MAC: forget the old neighbour entry.
        run(["ip", "neigh", "flush", "to", node.address, "dev", self.bridge], check=False)
        self.nodes.pop(node.netns, None)
        self._write_known_hosts()
        shutil.rmtree(node.dir, ignore_errors=True)

    def _allocate_host(self) -> int:
        """Next host number, round robin over .2-.254, so a freed address is reused as late as possible."""
        used = {int(n.address.rsplit(".", 1)[1]) for n in self.nodes.values()}
        for _ in range(253):
            host = self._next_host
            self._next_host = 2 if host >= 254 else host + 1
            if host not in used:
                return host
        raise HarnessError("no free address left in the test network (253 nodes alive)")

    def _plumb(self, node: Node) -> None:
        run(["ip", "netns", "add", node.netns])
        # Create the pair with the peer directly inside the namespace, named eth0 there.
        run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns])
        run(["ip", "link", "set", node.veth, "master", self.bridge, "up"])
        ns = ["ip", "-n", node.netns]
        run([*ns, "link", "set", "lo", "up"])
        run([*ns, "addr", "add", f"{node.address}/24", "dev", "eth0"])
        run([*ns, "link", "set", "eth0", "up"])
        run([*ns, "route", "add", "default", "via", self.gateway])
        run(["ip", "neigh", "flush", "to", node.address, "dev", self.bridge], check=False)

    def _start_sshd(self, node: Node) -> None:
        config = node.dir / "sshd_config"
        config.write_text(
            SSHD_CONFIG.format(
                port=node.port,
                host_key=node.host_key_file,
                pid_file=node.dir / "sshd.pid",
                authorized_keys=self.authorized_keys,
            )  # fmt: skip
        )
        argv = [
            SSHD,
            "-D",
            "-f",
            str(config),
            "-o",
            f"ListenAddress={node.address}",
            "-E",
            str(node.sshd_log),
        ]
        stderr_path = node.dir / "sshd.stderr"  # config errors go here, before -E takes over
        with open(stderr_path, "wb") as err:
            node.sshd = node.popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        proc = node.sshd

        def ready() -> bool:
            if proc.poll() is not None:
                raise HarnessError(
                    f"sshd in {node.netns} exited {proc.returncode}:\n{tail(stderr_path)}\n{tail(node.sshd_log)}"
                )
            # Logged after listen(): from then on connections succeed (no probe connection to log).
            return f"Server listening on {node.address} port {node.port}" in tail(node.sshd_log, 5)

        wait_until(ready, 10, f"sshd on {node.address}", on_timeout=lambda: tail(node.sshd_log))

    def _write_known_hosts(self) -> None:
        lines = []
        for node in self.nodes.values():
            if node.host_key_file.with_suffix(".pub").exists():
                keytype, key = node.host_key_file.with_suffix(".pub").read_text().split()[:2]
                host = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
                lines.append(f"{host} {keytype} {key}\n")
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.known_hosts)  # readers never see a half-written file


class NodeFactory:
    """Per-test nodes in a shared network; `cleanup()` removes the ones this factory made."""

    def __init__(self, network: NodeNetwork) -> None:
        self.network = network
        self.nodes: list[Node] = []

    def __call__(self, name: str) -> Node:
        if any(n.name == name for n in self.nodes):
            raise HarnessError(f"node {name!r} already exists in this test")
        try:
            node = self.network.add_node(name)
        except BaseException:
            self._remove_half_made(name)
            raise
        self.nodes.append(node)
        return node

    def _remove_half_made(self, name: str) -> None:
        for node in list(self.network.nodes.values()):
            if node.name == name and node not in self.nodes:
                self.network.remove_node(node)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"----- sshd log of node {n.name} ({n.netns}) -----\n{tail(n.sshd_log, lines)}" for n in self.nodes
        )

    def cleanup(self) -> None:
        errors = []
        for node in reversed(self.nodes):
            try:
                self.network.remove_node(node)
            except (HarnessError, OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        self.nodes.clear()
        if errors:
            raise HarnessError("node teardown failed:\n" + "\n".join(errors))


def _free_subnet() -> int:
    """A random third octet in 10.77.0.0/16 that no address or route on this machine uses yet."""
    text = run(["ip", "-o", "-4", "addr", "show"]).stdout + run(["ip", "-o", "-4", "route", "show"]).stdout
    used = {int(m) for m in re.findall(r"\b10\.77\.(\d+)\.", text)}
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise HarnessError("no free /24 left in 10.77.0.0/16 (leftover test bridges?)")
    return free[int(rand_hex(4), 16) % len(free)]


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs in the namespace (a test's stray process would keep it alive)."""
    proc = run(["ip", "netns", "pids", netns], check=False)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale_networks(run_dir: Path = RUN_DIR) -> list[str]:
    """Remove bridges, namespaces and key dirs left by a pytest process that no longer runs."""
    swept = []
    links = json.loads(run(["ip", "-j", "-d", "link", "show", "type", "bridge"]).stdout or "[]")
    namespaces = run(["ip", "netns", "list"]).stdout.split()  # "name (id: N)" lines: names are the words
    for link in links:
        name, alias = link.get("ifname", ""), link.get("ifalias", "")
        if not (re.fullmatch(r"htbr[0-9a-f]{4}", name) and alias.startswith(_ALIAS)):
            continue
        owner = alias[len(_ALIAS) :]
        if owner.isdigit() and pid_alive(int(owner)):
            continue
        rid = name[4:]
        for ns in namespaces:
            if re.fullmatch(rf"ht-.+-{rid}[0-9a-f]{{2}}", ns):
                _kill_netns_processes(ns)
                run(["ip", "netns", "del", ns], check=False)
        run(["ip", "link", "del", name], check=False)
        swept.append(name)
    if run_dir.is_dir():
        for entry in run_dir.glob("net-*-*"):
            pid = entry.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
    return swept

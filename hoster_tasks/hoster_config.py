"""Hoster's own record of a VM's parent: `parent_host` in `<VM dataset mountpoint>/vm_config.json`.

Hoster marks a VM as a backup copy when `parent_host` is not this host's name. hoster-tasks records the
parent in the ZFS user property `hoster-tasks:parent`; where that is absent (copies Hoster made before this
system), the file says it, so such copies are never snapshotted, pruned or replicated back as if they were
this node's own VMs.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

CONFIG_FILE = "vm_config.json"


def parent_host(mountpoint: str) -> str | None:
    """The `parent_host` recorded in the VM's config file, or None (not mounted, no file, not Hoster's)."""
    if not mountpoint.startswith("/"):  # "legacy", "none", "-": nothing to read
        return None
    try:
        data = json.loads((Path(mountpoint) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    value = data.get("parent_host") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def is_this_host(name: str, node_name: str) -> bool:
    """Hoster writes the host name; hoster-tasks knows its node name: either means this node."""
    host = socket.gethostname()
    return name in (node_name, host, host.split(".")[0])


def set_parent_host(mountpoint: str, host: str) -> bool:
    """Rewrite `parent_host` the way Hoster writes the file (JSON, three-space indent); False when the VM has
    no such file (a VM Hoster does not manage)."""
    path = Path(mountpoint) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    data["parent_host"] = host
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=3) + "\n")
    tmp.replace(path)
    return True

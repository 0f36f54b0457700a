"""`hoster-tasks config check`: what works and what does not on this node, one line per check.

The first command an operator runs on a new node. Each check runs on its own and reports; one that fails
never stops the next (except that nothing runs when the settings themselves are invalid, as for every
other command). In order: the environment (HOSTER_* names, the HOSTER_CONFIG file), the settings, Redis,
the error directory, this host's ZFS and dataset roots, then per target: SSH with the OpenSSH client as the
data path runs it (strict host key, batch mode), the target's ZFS through the control connection (Fabric,
host key rejected when unknown) and the target's roots.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hoster_tasks.cli.table import render
from hoster_tasks.errors import HosterTasksError
from hoster_tasks.settings import Endpoint, Settings
from hoster_tasks.zfs.probe import Capabilities, probe
from hoster_tasks.zfs.shell import LocalShell, Shell, SshShell, ssh_argv

OK, FAIL, SKIP = "ok", "FAIL", "skipped"
ENV_PREFIX = "HOSTER_"
EXTRA_VARIABLES = {"HOSTER_CONFIG"}  # read by the settings loader itself, not a field
PROBE_TIMEOUT = 30.0
DETAIL_CHARS = 200


@dataclass(frozen=True)
class Check:
    check: str
    result: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.result == FAIL


def _brief(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 1] + "…"


def _attempt(name: str, probe_fn: Callable[[], str]) -> Check:
    """One check: its detail when it works; the error, on one line, when it does not."""
    try:
        return Check(name, OK, _brief(probe_fn()))
    except Exception as exc:  # noqa: BLE001 - every failure is a line of the report, never a traceback
        detail = str(exc) if isinstance(exc, HosterTasksError) else f"{type(exc).__name__}: {exc}"
        return Check(name, FAIL, _brief(detail))


# -- environment and settings ------------------------------------------------------------------------------

def check_environment(environ: Mapping[str, str]) -> list[Check]:
    """A misspelt HOSTER_* variable is silently ignored by the settings: said here."""
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | EXTRA_VARIABLES
    given = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX))
    unknown = [k for k in given if k.upper() not in fields]
    out = [Check("environment", FAIL if unknown else OK,
                 f"unknown variable(s) {', '.join(unknown)} (ignored by the settings)" if unknown
                 else f"{len(given)} HOSTER_* variable(s), all known")]
    path = environ.get("HOSTER_CONFIG")
    if path:
        out.append(_attempt("settings file", lambda: _readable(Path(path))))
    return out


def _readable(path: Path) -> str:
    with open(path, "rb"):
        pass
    return str(path)


def load_settings() -> tuple[Settings | None, Check]:
    try:
        settings = Settings.from_env()
    except HosterTasksError as exc:
        return None, Check("settings", FAIL, _brief(str(exc)))
    targets = ", ".join(t.name for t in settings.targets) or "none"
    return settings, Check("settings", OK, f"node {settings.node_name}; datasets {', '.join(settings.datasets)}; "
                                           f"targets {targets}")


# -- this node ----------------------------------------------------------------------------------------------

def safe_url(url: str) -> str:
    """The URL without its user and password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def _redis(settings: Settings) -> str:
    from hoster_tasks.redis_conn import redis_client

    with redis_client(settings, socket_connect_timeout=3, socket_timeout=3) as client:
        info = client.info("server")
    return f"{safe_url(settings.redis_url)}: redis {info.get('redis_version', '?')}"


def _error_dir(settings: Settings) -> str:
    settings.error_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=settings.error_dir, prefix=".check."):
        pass  # node_exporter reads the ERROR_ files here: the worker must be able to write them
    return f"{settings.error_dir} is writable"


def describe_caps(caps: Capabilities) -> str:
    have = [name for name, on in asdict(caps).items() if on]
    lacks = [name for name, on in asdict(caps).items() if not on]
    return f"has {', '.join(have) or 'nothing'}" + (f"; lacks {', '.join(lacks)}" if lacks else "")


def _zfs(shell: Shell, zfs: str) -> str:
    return describe_caps(probe(shell, zfs))


def _datasets(shell: Shell, zfs: str, roots: Sequence[str]) -> str:
    """Each root exists: one `zfs list` of them all lists those that do (and exits non-zero if one does not)."""
    result = shell.run([zfs, "list", "-H", "-o", "name", *roots], check=False, timeout=PROBE_TIMEOUT)
    listed = set(result.stdout.split())
    missing = [root for root in roots if root not in listed]
    if missing:
        raise HosterTasksError(f"missing on {shell.host}: {', '.join(missing)}")
    return ", ".join(roots) + " exist"


# -- targets ------------------------------------------------------------------------------------------------

def _openssh(endpoint: Endpoint) -> str:
    """As the data path runs ssh (StrictHostKeyChecking=yes, BatchMode): an unknown host key fails here."""
    result = LocalShell().run(ssh_argv(endpoint, ["true"]), check=False, timeout=endpoint.connect_timeout + 10)
    if result.exit_code != 0:
        raise HosterTasksError(f"ssh exited {result.exit_code}: {result.stderr.strip() or '(no output)'}")
    where = f"{endpoint.user}@{endpoint.host}:{endpoint.port}"
    return f"{where}, host key known ({endpoint.known_hosts or 'system known_hosts'})"


def target_roots(settings: Settings, endpoint: Endpoint) -> list[str]:
    return [endpoint.target_dataset(root) for root in settings.datasets]


def check_target(settings: Settings, endpoint: Endpoint) -> list[Check]:
    ssh = _attempt(f"ssh {endpoint.name}", lambda: _openssh(endpoint))
    if ssh.failed:
        why = "ssh does not work"
        return [ssh, Check(f"zfs on {endpoint.name}", SKIP, why), Check(f"roots on {endpoint.name}", SKIP, why)]
    shell = SshShell(endpoint)
    try:
        return [ssh, _attempt(f"zfs on {endpoint.name}", lambda: _zfs(shell, settings.zfs_command)),
                _attempt(f"roots on {endpoint.name}",
                         lambda: _datasets(shell, settings.zfs_command, target_roots(settings, endpoint)))]
    finally:
        shell.close()


def run_checks(environ: Mapping[str, str] | None = None) -> list[Check]:
    checks = check_environment(os.environ if environ is None else environ)
    settings, loaded = load_settings()
    checks.append(loaded)
    if settings is None:
        return checks
    local = LocalShell()
    checks += [
        _attempt("redis", lambda: _redis(settings)),
        _attempt("error dir", lambda: _error_dir(settings)),
        _attempt("zfs (this node)", lambda: _zfs(local, settings.zfs_command)),
        _attempt("datasets (this node)", lambda: _datasets(local, settings.zfs_command, settings.datasets)),
    ]
    for endpoint in settings.targets:
        checks += check_target(settings, endpoint)
    return checks


def render_checks(rows: Sequence[Mapping[str, Any]]) -> str:
    return render("Hoster Config Check", ("Check", "Result", "Detail"),
                  [(r["check"], r["result"], r["detail"]) for r in rows])

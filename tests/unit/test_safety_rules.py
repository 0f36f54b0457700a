"""Pure rules behind the safety fixes: countdowns below the visibility timeout, routing by ownership, the
per-dataset ERROR_ file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoster_tasks.client import owner_of_dataset
from hoster_tasks.errors import ConfigError, ReadOnlyCopy, UnknownVM
from hoster_tasks.nodes import NodeInfo, VmInfo
from hoster_tasks.observability.errorfile import JOB_LINE, error_file, error_name, read_errors, update_errors
from hoster_tasks.settings import Settings


@pytest.mark.parametrize("field", ["retry_backoff_max_seconds", "lock_lease_seconds", "lock_wait_seconds"])
def test_no_countdown_may_reach_the_visibility_timeout(clean_env: None, field: str) -> None:
    others = {"retry_backoff_max_seconds": 10, "lock_lease_seconds": 10, "lock_wait_seconds": 10}
    with pytest.raises(ConfigError, match=f"{field} .* must be below visibility_timeout_seconds"):
        Settings.from_env(visibility_timeout_seconds=600, **{**others, field: 600})
    Settings.from_env(visibility_timeout_seconds=601, **{**others, field: 600})


def _node(name: str, *vms: VmInfo) -> NodeInfo:
    return NodeInfo(name, f"hoster.node.{name}", 0.0, vms)


def test_a_change_goes_to_the_owner_never_to_the_node_with_the_copy() -> None:
    copy = _node("backup", VmInfo("web", "tank/vm/web", "live"))
    live = _node("live", VmInfo("web", "tank/vm/web", "live"))
    assert owner_of_dataset([copy, live], "tank/vm/web").name == "live"  # the backup node is listed first
    with pytest.raises(ReadOnlyCopy, match="backup copy of node 'live'"):
        owner_of_dataset([copy], "tank/vm/web")
    with pytest.raises(UnknownVM):
        owner_of_dataset([live], "tank/vm/other")


def test_one_datasets_success_clears_its_own_line_only(tmp_path: Path) -> None:
    name = error_name("hoster01", None)
    update_errors(tmp_path, name, {"tank/vm/a": "diverged:\n  details", "tank/vm/b": "connection refused"}, [])
    update_errors(tmp_path, name, {}, ["tank/vm/a"])
    assert read_errors(tmp_path, name) == {"tank/vm/b": "connection refused"}
    assert error_file(tmp_path, name).read_text() == "tank/vm/b: connection refused\n"  # one line per dataset
    update_errors(tmp_path, name, {JOB_LINE: "inventory failed"}, ["tank/vm/b"])
    assert read_errors(tmp_path, name) == {JOB_LINE: "inventory failed"}
    update_errors(tmp_path, name, {}, [JOB_LINE])
    assert not error_file(tmp_path, name).exists()


def test_the_file_is_named_by_script_name_or_endpoint_name() -> None:
    assert error_name("hoster01", None) == "to_hoster01"
    assert error_name("hoster01", "nightly") == "nightly"

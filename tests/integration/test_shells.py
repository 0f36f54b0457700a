"""Both shells run the same argv the same way: hostile strings stay data, never syntax (zfs_autobackup's test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import zfs as hz

from hoster_tasks.errors import CommandFailed, DatasetNotFound
from hoster_tasks.settings import Endpoint
from hoster_tasks.zfs import ops
from hoster_tasks.zfs.probe import probe
from hoster_tasks.zfs.shell import LocalShell, SshShell, run_many

HOSTILE = "a'b\"c $(touch {m}) `touch {m}` ; touch {m} | cat && touch {m} \\ \n end"


@pytest.fixture
def shells(node_factory):  # type: ignore[no-untyped-def]
    node = node_factory("sh")
    ssh = SshShell(Endpoint(**node.endpoint()))
    yield [LocalShell(), ssh]
    ssh.close()


def test_hostile_string_is_one_argument_in_both_shells(shells, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(m=marker)
    for shell in shells:
        out = shell.run(["printf", "%s", hostile])
        assert out.stdout == hostile, shell.host
        assert out.argv == ("printf", "%s", hostile)
    assert not marker.exists()


def test_odd_but_valid_dataset_name_through_both_shells(shells, pool_factory) -> None:
    pool = pool_factory()
    odd = pool.create_dataset("vm/web:01.prod_x-y")
    hz.snapshot(odd, "custom_2026-01-01_00-00-00")
    for shell in shells:
        caps = probe(shell)
        snaps = ops.list_snapshots(shell, [odd], caps)
        assert [s.full for s in snaps[odd]] == [f"{odd}@custom_2026-01-01_00-00-00"], shell.host
        parent = ops.PARENT_PROPERTY
        assert ops.children_props(shell, [pool.ds("vm")], [parent]) == {odd: {parent: "-"}}


def test_errors_are_named_with_argv_exit_code_and_stderr_in_both_shells(shells, pool_factory) -> None:
    pool = pool_factory()
    missing = pool.ds("vm/absent")
    for shell in shells:
        with pytest.raises(DatasetNotFound) as err:
            ops.destroy_snapshot(shell, f"{missing}@x")
        assert err.value.argv == ["zfs", "destroy", f"{missing}@x"]
        assert err.value.exit_code == 1 and "does not exist" in err.value.stderr


def test_unknown_host_key_is_refused(node_factory, tmp_path: Path) -> None:
    node = node_factory("stranger")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    shell = SshShell(Endpoint(**node.endpoint(known_hosts=str(empty))))
    with pytest.raises(CommandFailed) as err:
        shell.run(["true"])
    assert "host key" in err.value.stderr
    # the OpenSSH data path refuses it too
    from hoster_tasks.zfs.shell import ssh_argv

    proc = node.exec(ssh_argv(Endpoint(**node.endpoint(known_hosts=str(empty))), ["true"]), check=False)
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr


def _accepted(node) -> int:  # type: ignore[no-untyped-def]
    return node.sshd_log.read_text().count("Accepted publickey for ")


def test_a_kept_connection_serves_every_task_of_a_process_and_reopens_after_a_cut(node_factory) -> None:
    """One SSH connection per endpoint and worker process (kept_ssh): a task's close() leaves it open for the
    next task; a connection cut while idle is reopened by the next command, which runs once."""
    from harness.proc import wait_until

    from hoster_tasks.zfs.shell import kept_ssh

    node = node_factory("kept")
    endpoint = Endpoint(**node.endpoint())
    shell = kept_ssh(endpoint)
    try:
        assert kept_ssh(Endpoint(**node.endpoint())) is shell  # the same settings: the same connection
        before = _accepted(node)
        for _ in range(3):
            assert shell.run(["true"]).exit_code == 0
            shell.close()  # what every task does at its end
        wait_until(lambda: _accepted(node) - before >= 1, 5, "sshd to log the connection")
        assert _accepted(node) - before == 1
        shell._conn.client.get_transport().close()  # type: ignore[union-attr]  # cut while idle
        assert shell.run(["echo", "back"]).stdout == "back\n"
        wait_until(lambda: _accepted(node) - before >= 2, 5, "sshd to log the new connection")
        assert _accepted(node) - before == 2
    finally:
        shell._drop()


def test_run_many_gives_each_commands_result_in_order_through_both_shells(shells, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(m=marker)
    for shell in shells:
        out = run_many(shell, [["printf", "%s", hostile], ["sh", "-c", "echo two; echo err >&2; exit 3"]], check=False)
        assert [(r.argv[0], r.exit_code, r.stdout, r.stderr) for r in out] == [
            ("printf", 0, hostile, ""), ("sh", 3, "two\n", "err\n")], shell.host
        with pytest.raises(CommandFailed) as err:  # checked: the failure is named, with its argv
            run_many(shell, [["true"], ["sh", "-c", "exit 3"]])
        assert err.value.argv == ["sh", "-c", "exit 3"] and err.value.exit_code == 3
    assert not marker.exists()


def test_run_many_over_ssh_runs_the_commands_at_the_same_time_on_one_connection(node_factory) -> None:
    """The first command waits for a file the second one makes: run one after the other, the first would
    give up (exit 1) before the second started."""
    from harness.proc import wait_until

    node = node_factory("many")
    shell = SshShell(Endpoint(**node.endpoint()))
    flag = f"/tmp/hoster-run-many-{node.name}"
    try:
        before = _accepted(node)
        wait = ["sh", "-c", 'i=0; until [ -e "$1" ]; do i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.1; done',
                "sh", flag]
        first, second = shell.run_many([wait, ["touch", flag]])
        assert first.exit_code == 0 and second.exit_code == 0
        wait_until(lambda: _accepted(node) - before >= 1, 5, "sshd to log the connection")
        assert _accepted(node) - before == 1  # one connection, a channel per command
    finally:
        shell.run(["rm", "-f", flag], check=False)
        shell.close()

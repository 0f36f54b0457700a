"""Flower's tasks page rows: replication rows named by VM and endpoint, exceptions cut to what failed."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from hoster_tasks.observability.flower import (
    CONFIG_FILE,
    TASKS_COLUMNS,
    flower_argv,
    format_task,
    row_label,
    short_exception,
)

STEP_ARGS = "(None, 'tank/vm-encrypted/web-01', 'backup', None, '9f2c', 'a1b2')"
SSH_FAILURE = ("DatasetNotFound(\"[broken] ssh -o BatchMode=yes -p 22 -l root -i /k -- 10.0.0.3 zfs receive -u "
               "tank/missing/vm/web-01 exited 1: cannot open 'tank/missing/vm/web-01': dataset does not exist\\n\")")


@pytest.mark.parametrize(("name", "args", "label"), [
    ("hoster.replication.step", STEP_ARGS, "web-01 → backup (tank/vm-encrypted/web-01)"),
    ("hoster.replication.step", "({'bytes': 10, 'complete': False}, 'tank/vm/db', 'offsite', 2.0, 'c', None)",
     "db → offsite (tank/vm/db)"),
    ("hoster.replication.finish", "({}, 'tank/vm/db', 'offsite', 'c', None)", "db → offsite (tank/vm/db)"),
    ("hoster.replication.chain_failed", "('id', 'tank/vm/db', 'offsite')", "db → offsite (tank/vm/db)"),
    ("hoster.replication.replicate", "('web-01', 'backup', None)", "web-01 → backup"),
    ("hoster.snapshot.take", "('web-01', 'custom', 3)", None),  # readable as it is
    ("hoster.replication.step", "({'plan': [1, 2, ...", None),  # truncated by Celery: left alone
    ("hoster.replication.step", "(None, 'tank/vm/db')", None),
    ("hoster.replication.step", None, None),
])
def test_row_label(name: str, args: str | None, label: str | None) -> None:
    assert row_label(name, args) == label


def test_short_exception_keeps_the_type_and_the_stderr() -> None:
    assert short_exception(SSH_FAILURE) == (
        "DatasetNotFound: cannot open 'tank/missing/vm/web-01': dataset does not exist")
    assert short_exception("Busy('tank/vm/a is locked', ['tank/vm/a'])") == "Busy: tank/vm/a is locked"
    command_error = ("DatasetNotFound(['ssh', '-p', '22', '--', '10.0.0.3', 'zfs receive -u t/missing/vm/a'], 1, "
                     "\"cannot open 't/missing/vm/a': dataset does not exist\\ncannot receive new filesystem "
                     "stream: dataset does not exist [stages: zfs=0; pv=0; ssh=1]\", 'broken')")
    assert short_exception(command_error) == "DatasetNotFound: cannot open 't/missing/vm/a': dataset does not exist"
    assert short_exception("not a repr") == "not a repr"
    assert short_exception(None) is None


def test_format_task_labels_the_row_and_keeps_every_argument() -> None:
    task = SimpleNamespace(name="hoster.replication.step", args=STEP_ARGS, exception=SSH_FAILURE)
    out = format_task(task)
    assert out.args.startswith("web-01 → backup") and out.args.endswith(STEP_ARGS)
    assert out.exception.startswith("DatasetNotFound: cannot open")
    plain = SimpleNamespace(name="hoster.snapshot.take", args="('web-01', 'custom', 3)", exception=None)
    assert format_task(plain).args == "('web-01', 'custom', 3)"


def test_flower_loads_the_columns_and_the_formatter_from_its_config_file() -> None:
    assert f"--conf={CONFIG_FILE}" in flower_argv("127.0.0.1", 5555)
    for column in ("args", "kwargs", "result", "exception", "worker"):
        assert column in TASKS_COLUMNS.split(",")
    # as Flower reads it: tornado executes the file and sets the options it defines
    probe = ("from tornado.options import options, parse_config_file; import flower.options; "
             f"parse_config_file({str(CONFIG_FILE)!r}, final=False); "
             "print(options.tasks_columns); print(options.format_task.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == [TASKS_COLUMNS, "hoster_tasks.observability.flower"]

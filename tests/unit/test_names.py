"""Name validation and this system's snapshot naming (hoster_tasks/names.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from hoster_tasks.errors import InvalidName, Permanent
from hoster_tasks.names import (
    SNAPSHOT_TYPES,
    SnapshotName,
    make_snapshot_name,
    parse_snapshot_name,
    validate_dataset,
    validate_node_name,
    validate_snapshot,
    validate_snapshot_name,
    validate_stype,
    validate_vm,
    vm_of,
)

# Refused everywhere a name is accepted (dataset, VM, snapshot name, node name).
HOSTILE_COMPONENTS = [
    "a;rm -rf /",
    "$(x)",
    "`x`",
    "a`id`b",
    "..",
    "../etc",
    "a b",
    " a",
    "a\tb",
    "-rf",
    "-",
    "",
    "a|b",
    "a&b",
    "a>b",
    "a'b",
    'a"b',
    "a\\b",
    "a*",
    "a?",
    "a\x00b",
    "ümlaut",
]

HOSTILE_DATASETS = [
    *[f"zroot/{c}" for c in HOSTILE_COMPONENTS if c],
    "",
    "-zroot/vm",
    "zroot/-vm",
    "zroot/../vm",
    "zroot/./vm",
    "zroot/",
    "/zroot",
    "zroot//vm",
    "zroot/vm@snap",
    "zroot/vm#bookmark",
    "zroot/" + "a" * 300,
    "a" * 256,
]

@pytest.mark.parametrize("name", HOSTILE_DATASETS)
def test_validate_dataset_refuses_hostile(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_dataset(name)


@pytest.mark.parametrize("name", ["zroot/vm\nzroot/other", "\nzroot/vm"])
def test_validate_dataset_refuses_inner_newline(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_dataset(name)


@pytest.mark.parametrize(
    "validate, name",
    [
        (validate_dataset, "zroot/vm\n"),
        (validate_dataset, "zroot\n/vm"),
        (validate_vm, "vm1\n"),
        (validate_snapshot_name, "hourly\n"),
        (validate_snapshot, "zroot/vm@s\n"),
        (validate_node_name, "node1\n"),
    ],
)
def test_trailing_newline_refused(validate: Callable[[str], object], name: str) -> None:
    with pytest.raises(InvalidName):
        validate(name)


def test_invalid_name_is_a_permanent_value_error() -> None:
    with pytest.raises(InvalidName) as info:
        validate_dataset("zroot/a;b")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, Permanent)
    assert "zroot/a;b" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["zroot", "zroot/vm-encrypted", "zroot/vm-encrypted/web:01.prod_x-y", "tank/1vm", "a/b/c/d", "p/" + "x" * 250],
)
def test_validate_dataset_accepts_odd_but_valid(name: str) -> None:
    assert validate_dataset(name) == name


def test_dataset_length_limit_is_255() -> None:
    assert validate_dataset("p/" + "x" * 253) == "p/" + "x" * 253
    with pytest.raises(InvalidName):
        validate_dataset("p/" + "x" * 254)


@pytest.mark.parametrize("name", [c for c in HOSTILE_COMPONENTS] + ["a/b", "x" * 201, "a@b", "a#b"])
def test_validate_vm_refuses_hostile(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_vm(name)


@pytest.mark.parametrize("name", ["web:01.prod_x-y", "1vm", "vm", "a.b", "x" * 200])
def test_validate_vm_accepts(name: str) -> None:
    assert validate_vm(name) == name


@pytest.mark.parametrize("short", [c for c in HOSTILE_COMPONENTS] + ["a@b", "a/b", "x" * 201])
def test_validate_snapshot_name_refuses_hostile(short: str) -> None:
    with pytest.raises(InvalidName):
        validate_snapshot_name(short)


@pytest.mark.parametrize(
    "full",
    [
        "zroot/vm",
        "zroot/vm@",
        "@snap",
        "zroot/vm@a@b",
        "zroot/vm@-x",
        "zroot/vm@$(id)",
        "zroot/v m@s",
        "zroot/vm@a;b",
        "zroot/vm#b@s",
        "z/" + "x" * 200 + "@" + "y" * 60,  # each part valid, the whole longer than 255
    ],
)
def test_validate_snapshot_refuses(full: str) -> None:
    with pytest.raises(InvalidName):
        validate_snapshot(full)


def test_validate_snapshot_splits() -> None:
    assert validate_snapshot("zroot/vm-encrypted/web:01@hourly_2024-01-02_03-04-05") == (
        "zroot/vm-encrypted/web:01",
        "hourly_2024-01-02_03-04-05",
    )


@pytest.mark.parametrize("name", ["", "-node", ".node", "a b", "a;b", "n" * 64, "a/b", "a:b", "$(x)"])
def test_validate_node_name_refuses(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_node_name(name)


@pytest.mark.parametrize("name", ["hoster01", "1node", "node-a.b_c", "n" * 63])
def test_validate_node_name_accepts(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize("stype", SNAPSHOT_TYPES)
def test_validate_stype_accepts_known(stype: str) -> None:
    assert validate_stype(stype) == stype


@pytest.mark.parametrize("stype", ["", "Hourly", "minutely", "hourly ", "autosnap"])
def test_validate_stype_refuses(stype: str) -> None:
    with pytest.raises(InvalidName):
        validate_stype(stype)


# -- make_snapshot_name --------------------------------------------------------------------------------

NOW = datetime(2024, 3, 9, 4, 5, 6, 789000, tzinfo=UTC)


def test_make_snapshot_name_format() -> None:
    assert make_snapshot_name("hourly", NOW) == "hourly_2024-03-09_04-05-06"


def test_make_snapshot_name_converts_to_utc() -> None:
    plus2 = datetime(2024, 1, 1, 1, 30, 0, tzinfo=timezone(timedelta(hours=2)))
    assert make_snapshot_name("daily", plus2) == "daily_2023-12-31_23-30-00"


def test_make_snapshot_name_same_second_collision() -> None:
    first = make_snapshot_name("custom", NOW)
    second = make_snapshot_name("custom", NOW, {first})
    third = make_snapshot_name("custom", NOW, {first, second})
    assert (first, second, third) == (
        "custom_2024-03-09_04-05-06",
        "custom_2024-03-09_04-05-06-1",
        "custom_2024-03-09_04-05-06-2",
    )


def test_make_snapshot_name_ignores_other_types_and_seconds() -> None:
    existing = {"daily_2024-03-09_04-05-06", "hourly_2024-03-09_04-05-05"}
    assert make_snapshot_name("hourly", NOW, existing) == "hourly_2024-03-09_04-05-06"


def test_make_snapshot_name_refuses_unknown_type() -> None:
    with pytest.raises(InvalidName):
        make_snapshot_name("autosnap", NOW)


@pytest.mark.parametrize("stype", SNAPSHOT_TYPES)
def test_made_names_are_valid_and_parse_back(stype: str) -> None:
    name = make_snapshot_name(stype, NOW, {f"{stype}_2024-03-09_04-05-06"})
    assert validate_snapshot_name(name) == name
    parsed = parse_snapshot_name(name)
    assert parsed == SnapshotName(NOW.replace(microsecond=0), 1, stype)
    assert str(parsed) == name


# -- parse_snapshot_name -------------------------------------------------------------------------------


def test_parse_ours() -> None:
    parsed = parse_snapshot_name("weekly_2023-08-16_05-05-00-3")
    assert parsed is not None
    assert parsed.stype == "weekly"
    assert parsed.seq == 3
    assert parsed.taken_at == datetime(2023, 8, 16, 5, 5, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "name",
    [
        "autosnap_2023-08-12_13:21:36_daily",  # sanoid
        "autosnap_2023-08-12_13:21:36_hourly",
        "syncoid_host_2023-08-12:13:21:36-GMT00:00",  # syncoid
        "syncoid_hoster01_2023-08-12:13:21:36-GMT02:00",
        "zrepl_20230812_132136_000",
        "manual",
        "hourly",
        "hourly_2023-08-12",
        "hourly_2023-08-12_13-21-36_extra",
        "hourly_2023-08-12_13:21:36",
        "Hourly_2023-08-12_13-21-36",
        "minutely_2023-08-12_13-21-36",
        "xhourly_2023-08-12_13-21-36",
        "hourly_2023-08-12_13-21-36-",
        "hourly_2023-08-12_13-21-36-x",
        "",
    ],
)
def test_parse_foreign_is_none(name: str) -> None:
    assert parse_snapshot_name(name) is None


@pytest.mark.parametrize(
    "name", ["daily_2023-02-30_00-00-00", "hourly_2023-13-01_00-00-00", "hourly_2023-01-01_25-00-00"]
)
def test_parse_impossible_date_is_foreign(name: str) -> None:
    assert parse_snapshot_name(name) is None


def test_snapshot_names_order_by_time_then_sequence() -> None:
    names = [
        "hourly_2024-01-02_00-00-00",
        "daily_2024-01-01_00-00-00-2",
        "hourly_2023-12-31_23-59-59",
        "daily_2024-01-01_00-00-00",
        "daily_2024-01-01_00-00-00-1",
        "hourly_2024-01-01_00-00-01",
    ]
    parsed = [parse_snapshot_name(n) for n in names]
    assert all(p is not None for p in parsed)
    ordered = [str(p) for p in sorted(p for p in parsed if p is not None)]
    assert ordered == [
        "hourly_2023-12-31_23-59-59",
        "daily_2024-01-01_00-00-00",
        "daily_2024-01-01_00-00-00-1",
        "daily_2024-01-01_00-00-00-2",
        "hourly_2024-01-01_00-00-01",
        "hourly_2024-01-02_00-00-00",
    ]


# -- vm_of ---------------------------------------------------------------------------------------------

ROOTS = ["zroot/vm-encrypted", "zroot/vm-unencrypted"]


@pytest.mark.parametrize(
    "dataset, vm",
    [
        ("zroot/vm-encrypted/web1", "web1"),
        ("zroot/vm-unencrypted/db:01", "db:01"),
        ("zroot/vm-encrypted", None),
        ("zroot/vm-encrypted/web1/disk0", None),
        ("zroot/vm-encrypted2/web1", None),
        ("zroot/other/web1", None),
        ("zroot", None),
    ],
)
def test_vm_of(dataset: str, vm: str | None) -> None:
    assert vm_of(dataset, ROOTS) == vm


def test_vm_of_without_roots() -> None:
    assert vm_of("zroot/vm-encrypted/web1", []) is None

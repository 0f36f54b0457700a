"""Parsers of zfs output (hoster_tasks/zfs/parse.py)."""

from __future__ import annotations

import pytest

from hoster_tasks.zfs.parse import (
    Snapshot,
    bookmarks_from_get,
    datasets_from_get,
    parse_get,
    parse_names,
    parse_send_size,
    snapshots_from_get,
)

# `zfs get -Hp -r -o name,property,value guid,createtxg,... zroot/vm-encrypted/web1 ...` as zfs-fuse prints it
GET_OUTPUT = (
    "zroot/vm-encrypted/web1\tguid\t1111\n"
    "zroot/vm-encrypted/web1\tcreatetxg\t1\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\tguid\t17293822569102704642\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\tcreatetxg\t300\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\tcreation\t1704080000\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\tused\t2068480\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\treferenced\t4096000\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00\tuserrefs\t1\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_01-33-00\tguid\t42\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_01-33-00\tcreatetxg\t100\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_01-33-00\tclones\tzroot/vm-encrypted/web1-clone\n"
    "zroot/vm-encrypted/web2\tguid\t2222\n"
    "zroot/vm-encrypted/web2@autosnap_2023-08-12_13:21:36_daily\tguid\t7\n"
    "zroot/vm-encrypted/web2@autosnap_2023-08-12_13:21:36_daily\tcreatetxg\t50\n"
    "zroot/vm-encrypted/web2@autosnap_2023-08-12_13:21:36_daily\tused\t-\n"
    "zroot/vm-encrypted/web2@autosnap_2023-08-12_13:21:36_daily\tclones\t-\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_02-33-00\tguid\t43\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_02-33-00\tcreatetxg\t200\n"
    "zroot/vm-encrypted/web1@hourly_2024-01-01_02-33-00\tclones\t\n"
    "zroot/vm-encrypted/web1\thoster:parent_host\t-\n"
)


def test_parse_get_groups_by_name() -> None:
    props = parse_get(GET_OUTPUT)
    assert props["zroot/vm-encrypted/web1"] == {"guid": "1111", "createtxg": "1", "hoster:parent_host": "-"}
    assert props["zroot/vm-encrypted/web1@hourly_2024-01-01_01-33-00"] == {
        "guid": "42",
        "createtxg": "100",
        "clones": "zroot/vm-encrypted/web1-clone",
    }
    assert props["zroot/vm-encrypted/web1@hourly_2024-01-01_02-33-00"]["clones"] == ""
    assert len(props) == 6


def test_parse_get_values_with_spaces_kept() -> None:
    props = parse_get("tank/x\thoster:note\ta value  with spaces\n")
    assert props == {"tank/x": {"hoster:note": "a value  with spaces"}}


def test_parse_get_skips_blank_lines_and_crlf_free() -> None:
    assert parse_get("\n\ntank/x\tguid\t5\n\n") == {"tank/x": {"guid": "5"}}
    assert parse_get("") == {}


@pytest.mark.parametrize("line", ["tank/x guid 5", "tank/x\tguid", "only-one-field"])
def test_parse_get_refuses_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="unexpected zfs get line"):
        parse_get(line + "\n")


def test_parse_get_value_with_tab() -> None:
    assert parse_get("tank/x\thoster:note\ta\tb\n") == {"tank/x": {"hoster:note": "a\tb"}}


def test_snapshots_from_get_grouped_and_sorted_by_createtxg() -> None:
    by_ds = snapshots_from_get(parse_get(GET_OUTPUT))
    assert sorted(by_ds) == ["zroot/vm-encrypted/web1", "zroot/vm-encrypted/web2"]
    web1 = by_ds["zroot/vm-encrypted/web1"]
    assert [s.name for s in web1] == [
        "hourly_2024-01-01_01-33-00",
        "hourly_2024-01-01_02-33-00",
        "hourly_2024-01-01_03-33-00",
    ]
    assert [s.createtxg for s in web1] == [100, 200, 300]
    assert web1[2] == Snapshot(
        dataset="zroot/vm-encrypted/web1",
        name="hourly_2024-01-01_03-33-00",
        guid=17293822569102704642,
        createtxg=300,
        creation=1704080000,
        used=2068480,
        referenced=4096000,
        userrefs=1,
        clones="",
    )
    assert web1[2].full == "zroot/vm-encrypted/web1@hourly_2024-01-01_03-33-00"


def test_snapshots_from_get_protected() -> None:
    web1 = {s.name: s for s in snapshots_from_get(parse_get(GET_OUTPUT))["zroot/vm-encrypted/web1"]}
    assert web1["hourly_2024-01-01_01-33-00"].protected is True  # cloned
    assert web1["hourly_2024-01-01_01-33-00"].clones == "zroot/vm-encrypted/web1-clone"
    assert web1["hourly_2024-01-01_02-33-00"].protected is False  # empty clones
    assert web1["hourly_2024-01-01_03-33-00"].protected is True  # held


def test_snapshots_from_get_dash_values() -> None:
    (foreign,) = snapshots_from_get(parse_get(GET_OUTPUT))["zroot/vm-encrypted/web2"]
    assert foreign.name == "autosnap_2023-08-12_13:21:36_daily"
    assert foreign.used == 0
    assert foreign.clones == ""
    assert foreign.userrefs == 0
    assert foreign.protected is False


def test_snapshots_from_get_ignores_datasets() -> None:
    props = parse_get("tank/a\tguid\t1\ntank/b\tguid\t2\n")
    assert snapshots_from_get(props) == {}
    assert datasets_from_get(props) == {"tank/a": {"guid": "1"}, "tank/b": {"guid": "2"}}


def test_datasets_from_get_excludes_snapshots() -> None:
    ds = datasets_from_get(parse_get(GET_OUTPUT))
    assert sorted(ds) == ["zroot/vm-encrypted/web1", "zroot/vm-encrypted/web2"]


def test_parse_names() -> None:
    assert parse_names("zroot/vm-encrypted\nzroot/vm-encrypted/web1\n\n  \nzroot/vm-encrypted/web2\n") == [
        "zroot/vm-encrypted",
        "zroot/vm-encrypted/web1",
        "zroot/vm-encrypted/web2",
    ]


@pytest.mark.parametrize(
    "text, size",
    [
        ("full\tzroot/vm@s\t123456\nsize\t123456\n", 123456),
        ("incremental\thourly_a\tzroot/vm@hourly_b\t4096\nsize\t4096\n", 4096),
        ("send from @a to zroot/vm@b estimated size is 4.00K\nsize\t4096\n", 4096),
        ("size\t0\n", 0),
        ("resume token contents:\nnvlist version: 0\n\tobject = 0x6\nfull\tzroot/vm@s\t99\nsize\t99\n", 99),
    ],
)
def test_parse_send_size(text: str, size: int) -> None:
    assert parse_send_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "full\tzroot/vm@s\t123\n", "size\t-\n", "size\t12K\n", "cannot open 'zroot/vm@s': dataset does not exist\n"],
)
def test_parse_send_size_absent(text: str) -> None:
    assert parse_send_size(text) is None


def test_bookmarks_are_listed_apart_from_snapshots() -> None:
    props = parse_get(
        "p/a\tguid\t1\n"
        "p/a@s1\tguid\t11\np/a@s1\tcreatetxg\t5\n"
        "p/a#m1\tguid\t11\np/a#m1\tcreatetxg\t5\np/a#m1\tused\t-\n"
    )
    assert [s.full for s in snapshots_from_get(props)["p/a"]] == ["p/a@s1"]
    (mark,) = bookmarks_from_get(props)["p/a"]
    assert (mark.full, mark.guid, mark.createtxg, mark.bookmark) == ("p/a#m1", 11, 5, True)
    assert list(datasets_from_get(props)) == ["p/a"]

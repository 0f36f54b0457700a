"""Retention: keep the newest N of a type (hoster_tasks/policy/retention.py)."""

from __future__ import annotations

import pytest

from hoster_tasks.errors import ConfigError, InvalidName
from hoster_tasks.policy.retention import RetentionPlan, check_keep, plan_retention
from hoster_tasks.zfs.parse import Snapshot

DS = "zroot/vm-encrypted/web1"


def snap(name: str, txg: int, guid: int | None = None, userrefs: int = 0, clones: str = "") -> Snapshot:
    return Snapshot(DS, name, guid if guid is not None else 1000 + txg, txg, userrefs=userrefs, clones=clones)


def hourly(i: int, **kw: object) -> Snapshot:
    """The i-th hourly snapshot (createtxg 10*i, so names and txgs agree)."""
    return snap(f"hourly_2024-01-01_{i:02d}-33-00", 10 * i, **kw)  # type: ignore[arg-type]


def names(plan_part: tuple[Snapshot, ...]) -> list[str]:
    return [s.name for s in plan_part]


def test_keeps_newest_n_destroys_oldest_first() -> None:
    snaps = [hourly(i) for i in range(1, 7)]
    plan = plan_retention(snaps, "hourly", 3)
    assert names(plan.destroy) == [hourly(1).name, hourly(2).name, hourly(3).name]
    assert plan.spared == ()


def test_order_is_by_createtxg_not_input_order_or_name() -> None:
    # Names (and clocks) can lie: a snapshot named later but created earlier is older.
    a = snap("hourly_2024-01-01_05-00-00", txg=100)
    b = snap("hourly_2024-01-01_01-00-00", txg=300)
    c = snap("hourly_2024-01-01_03-00-00", txg=200)
    plan = plan_retention([b, c, a], "hourly", 1)
    assert plan.destroy == (a, c)


@pytest.mark.parametrize("keep, count", [(6, 6), (10, 6), (1, 1)])
def test_nothing_destroyed_when_within_keep(keep: int, count: int) -> None:
    snaps = [hourly(i) for i in range(1, count + 1)]
    assert plan_retention(snaps, "hourly", keep) == RetentionPlan((), ())


def test_keep_one_keeps_only_newest() -> None:
    snaps = [hourly(i) for i in range(1, 5)]
    plan = plan_retention(snaps, "hourly", 1)
    assert names(plan.destroy) == [hourly(i).name for i in (1, 2, 3)]


def test_other_types_untouched() -> None:
    snaps = [
        snap("daily_2024-01-01_04-05-00", 1),
        hourly(1),
        snap("weekly_2024-01-03_05-05-00", 2),
        hourly(2),
        snap("daily_2024-01-02_04-05-00", 3),
        hourly(3),
        snap("replication_2024-01-01_00-00-00", 4),
    ]
    plan = plan_retention(snaps, "hourly", 1)
    assert names(plan.destroy) == [hourly(1).name, hourly(2).name]
    daily = plan_retention(snaps, "daily", 1)
    assert names(daily.destroy) == ["daily_2024-01-01_04-05-00"]


@pytest.mark.parametrize(
    "foreign",
    [
        "autosnap_2023-08-12_13:21:36_hourly",
        "syncoid_host_2023-08-12:13:21:36-GMT00:00",
        "hourly",
        "before-upgrade",
        "hourly_2023-08-12_13:21:36",
    ],
)
def test_foreign_names_never_destroyed(foreign: str) -> None:
    snaps = [snap(foreign, 1), hourly(1), hourly(2)]
    plan = plan_retention(snaps, "hourly", 1)
    assert names(plan.destroy) == [hourly(1).name]
    assert foreign not in names(plan.destroy)


def test_held_and_cloned_spared_with_reason() -> None:
    held = hourly(1, userrefs=2)
    cloned = hourly(2, clones="zroot/vm-encrypted/web1-clone")
    plain = hourly(3)
    plan = plan_retention([held, cloned, plain, hourly(4)], "hourly", 1)
    assert plan.destroy == (plain,)
    assert plan.spared == ((held, "held"), (cloned, "cloned"))


def test_replication_base_spared_whatever_keep_says() -> None:
    snaps = [hourly(i) for i in range(1, 6)]
    base = snaps[0]
    plan = plan_retention(snaps, "hourly", 1, bases=frozenset({base.guid}))
    assert base not in plan.destroy
    assert plan.spared == ((base, "replication base"),)
    assert names(plan.destroy) == [hourly(i).name for i in (2, 3, 4)]


def test_base_is_matched_by_guid_not_name() -> None:
    snaps = [hourly(i) for i in range(1, 4)]
    unrelated_guid = 999_999
    plan = plan_retention(snaps, "hourly", 1, bases=frozenset({unrelated_guid}))
    assert names(plan.destroy) == [hourly(1).name, hourly(2).name]


def test_several_bases_all_spared() -> None:
    snaps = [hourly(i) for i in range(1, 6)]
    plan = plan_retention(snaps, "hourly", 2, bases=frozenset({snaps[0].guid, snaps[2].guid}))
    assert names(plan.destroy) == [hourly(2).name]
    assert [s.name for s, _ in plan.spared] == [hourly(1).name, hourly(3).name]


def test_base_reason_wins_over_held() -> None:
    base = hourly(1, userrefs=1)
    plan = plan_retention([base, hourly(2)], "hourly", 1, bases=frozenset({base.guid}))
    assert plan.spared == ((base, "replication base"),)


def test_empty_list() -> None:
    assert plan_retention([], "hourly", 3) == RetentionPlan((), ())


@pytest.mark.parametrize("keep", [0, -1, -100])
def test_keep_below_one_refused(keep: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        plan_retention([hourly(1)], "hourly", keep)


@pytest.mark.parametrize("keep", [0, -3, "3", 2.0, None])
def test_check_keep_refuses(keep: object) -> None:
    with pytest.raises(ConfigError):
        check_keep(keep)  # type: ignore[arg-type]


def test_check_keep_accepts() -> None:
    assert check_keep(1) == 1
    assert check_keep(24) == 24


def test_unknown_type_refused() -> None:
    with pytest.raises(InvalidName):
        plan_retention([hourly(1)], "autosnap", 3)

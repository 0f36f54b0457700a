"""Replication planning (hoster_tasks/policy/planner.py): matched by GUID, ordered by createtxg."""

from __future__ import annotations

from hoster_tasks.policy.planner import Action, Plan, Step, StepKind, plan_replication, target_prune
from hoster_tasks.zfs.parse import Snapshot

SRC = "zroot/vm-encrypted/web1"
DST = "backup/vm-encrypted/web1"


def s(name: str, guid: int, txg: int, userrefs: int = 0, clones: str = "") -> Snapshot:
    return Snapshot(SRC, name, guid, txg, userrefs=userrefs, clones=clones)


def t(name: str, guid: int, txg: int, userrefs: int = 0, clones: str = "") -> Snapshot:
    """A target snapshot: same GUID as on the source, its own createtxg."""
    return Snapshot(DST, name, guid, txg, userrefs=userrefs, clones=clones)


H1 = "hourly_2024-01-01_01-33-00"
H2 = "hourly_2024-01-01_02-33-00"
H3 = "hourly_2024-01-01_03-33-00"
H4 = "hourly_2024-01-01_04-33-00"


# -- plan_replication ----------------------------------------------------------------------------------


def test_source_without_snapshots_is_nothing() -> None:
    plan = plan_replication([], None)
    assert plan.action == Action.NOTHING
    assert plan.steps == ()


def test_up_to_date_is_nothing() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20)]
    tgt = [t(H1, 1, 5), t(H2, 2, 6)]
    plan = plan_replication(src, tgt)
    assert plan.action == Action.NOTHING
    assert plan.steps == ()
    assert plan.common == src[1]
    assert plan.final_base == src[1]


def test_target_absent_single_snapshot_is_one_full() -> None:
    only = s(H1, 1, 10)
    plan = plan_replication([only], None)
    assert plan.action == Action.FULL
    assert plan.steps == (Step(StepKind.FULL, only),)
    assert plan.final_base == only


def test_target_absent_full_of_oldest_then_one_incremental_to_newest() -> None:
    src = [s(H3, 3, 30), s(H1, 1, 10), s(H2, 2, 20)]  # unsorted on purpose
    plan = plan_replication(src, None)
    assert plan.action == Action.FULL
    assert plan.steps == (
        Step(StepKind.FULL, src[1]),
        Step(StepKind.INCREMENTAL, src[0], base=src[1]),
    )
    assert plan.common is None
    assert plan.final_base == src[0]


def test_target_absent_uses_createtxg_not_names() -> None:
    old_by_txg = s(H4, 4, 5)  # named last, created first
    plan = plan_replication([s(H1, 1, 10), old_by_txg, s(H2, 2, 20)], None)
    assert plan.steps[0] == Step(StepKind.FULL, old_by_txg)
    assert plan.steps[1].snapshot.name == H2


def test_incremental_from_newest_common() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20), s(H3, 3, 30), s(H4, 4, 40)]
    tgt = [t(H1, 1, 100), t(H2, 2, 101)]
    plan = plan_replication(src, tgt)
    assert plan.action == Action.INCREMENTAL
    assert plan.common == src[1]
    assert plan.steps == (Step(StepKind.INCREMENTAL, src[3], base=src[1]),)
    assert plan.final_base == src[3]


def test_same_name_different_guid_is_not_common() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20)]
    tgt = [t(H1, 901, 5), t(H2, 902, 6)]  # same names, made independently
    plan = plan_replication(src, tgt)
    assert plan.action == Action.DIVERGED
    assert plan.steps == ()
    assert plan.common is None


def test_different_name_same_guid_is_common() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20)]
    tgt = [t("renamed-on-target", 1, 7)]
    plan = plan_replication(src, tgt)
    assert plan.action == Action.INCREMENTAL
    assert plan.common == src[0]
    assert plan.steps == (Step(StepKind.INCREMENTAL, src[1], base=src[0]),)


def test_common_chosen_by_guid_skips_name_lookalike() -> None:
    # The target's H2 is an impostor (other GUID): the newest real common snapshot is H1.
    src = [s(H1, 1, 10), s(H2, 2, 20), s(H3, 3, 30)]
    tgt = [t(H1, 1, 5)]
    plan = plan_replication(src, tgt)
    assert plan.common == src[0]
    assert plan.steps[0].base == src[0]


def test_target_exists_without_snapshots_is_diverged() -> None:
    plan = plan_replication([s(H1, 1, 10)], [])
    assert plan.action == Action.DIVERGED
    assert plan.steps == ()
    assert "no snapshots" in plan.reason


def test_no_common_snapshot_is_diverged() -> None:
    plan = plan_replication([s(H1, 1, 10), s(H2, 2, 20)], [t("other", 77, 3)])
    assert plan.action == Action.DIVERGED
    assert plan.steps == ()
    assert "no snapshot in common" in plan.reason


def test_target_newer_snapshot_source_never_had_is_diverged() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20), s(H3, 3, 30)]
    tgt = [t(H1, 1, 5), t(H2, 2, 6), t("made-on-target", 555, 7)]
    plan = plan_replication(src, tgt)
    assert plan.action == Action.DIVERGED
    assert plan.steps == ()
    assert plan.common == src[1]
    assert "made-on-target" in plan.reason


def test_target_newer_snapshot_diverged_even_when_source_has_nothing_new() -> None:
    src = [s(H1, 1, 10)]
    tgt = [t(H1, 1, 5), t(H2, 999, 6)]
    assert plan_replication(src, tgt).action == Action.DIVERGED


def test_target_older_snapshots_pruned_on_source_are_fine() -> None:
    # The source pruned H1 and H2 after they were replicated; the target still has them.
    src = [s(H3, 3, 30), s(H4, 4, 40)]
    tgt = [t(H1, 1, 5), t(H2, 2, 6), t(H3, 3, 7)]
    plan = plan_replication(src, tgt)
    assert plan.action == Action.INCREMENTAL
    assert plan.common == src[0]
    assert plan.steps == (Step(StepKind.INCREMENTAL, src[1], base=src[0]),)


def test_target_older_foreign_snapshot_is_fine() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20)]
    tgt = [t("autosnap_2023-08-12_13:21:36_daily", 4444, 2), t(H1, 1, 5)]
    assert plan_replication(src, tgt).action == Action.INCREMENTAL


def test_plan_is_frozen_value() -> None:
    plan = plan_replication([s(H1, 1, 10)], None)
    assert isinstance(plan, Plan)
    assert plan == plan_replication([s(H1, 1, 10)], None)


# -- target_prune --------------------------------------------------------------------------------------


def test_prunes_ours_that_source_no_longer_has() -> None:
    source = [s(H3, 3, 30), s(H4, 4, 40)]
    target = [t(H2, 2, 6), t(H1, 1, 5), t(H3, 3, 7), t(H4, 4, 8)]
    assert target_prune(source, target, base_guid=4) == [target[1], target[0]]  # oldest first


def test_prune_never_the_base() -> None:
    source = [s(H4, 4, 40)]
    target = [t(H1, 1, 5), t(H2, 2, 6), t(H4, 4, 8)]
    assert [x.name for x in target_prune(source, target, base_guid=2)] == [H1]


def test_prune_never_held_or_cloned() -> None:
    source = [s(H4, 4, 40)]
    held = t(H1, 1, 5, userrefs=1)
    cloned = t(H2, 2, 6, clones="backup/vm-encrypted/web1-restore")
    plain = t(H3, 3, 7)
    assert target_prune(source, [held, cloned, plain, t(H4, 4, 8)], base_guid=4) == [plain]


def test_prune_never_foreign_names() -> None:
    source = [s(H4, 4, 40)]
    target = [
        t("autosnap_2023-08-12_13:21:36_daily", 11, 1),
        t("syncoid_host_2023-08-12:13:21:36-GMT00:00", 12, 2),
        t("before-upgrade", 13, 3),
        t(H1, 1, 5),
        t(H4, 4, 8),
    ]
    assert [x.name for x in target_prune(source, target, base_guid=4)] == [H1]


def test_prune_keeps_what_source_has_by_guid_even_if_renamed() -> None:
    source = [s("hourly_2024-02-01_00-00-00", 1, 10), s(H4, 4, 40)]
    target = [t(H1, 1, 5), t(H4, 4, 8)]  # same GUID as the source's first, other name
    assert target_prune(source, target, base_guid=4) == []


def test_prune_nothing_when_in_sync() -> None:
    source = [s(H1, 1, 10), s(H2, 2, 20)]
    target = [t(H1, 1, 5), t(H2, 2, 6)]
    assert target_prune(source, target, base_guid=2) == []


# -- bookmarks as the last resort base ------------------------------------------------------------------


def b(name: str, guid: int, txg: int) -> Snapshot:
    return Snapshot(SRC, name, guid, txg, bookmark=True)


def test_a_bookmark_of_the_lost_common_snapshot_is_the_base() -> None:
    """H1 was destroyed on the source by hand; its bookmark remains: -i #H1 @H2, then -I @H2 @H4."""
    src = [s(H2, 2, 20), s(H3, 3, 30), s(H4, 4, 40)]
    tgt = [t(H1, 1, 5)]
    plan = plan_replication(src, tgt, bookmarks=[b("mark-old", 9, 1), b(f"x.{H1}", 1, 10)])
    assert plan.action == Action.INCREMENTAL
    assert [(st.kind, st.base.full if st.base else None, st.snapshot.name) for st in plan.steps] == [
        (StepKind.INCREMENTAL, f"{SRC}#x.{H1}", H2),
        (StepKind.INCREMENTAL, f"{SRC}@{H2}", H4),
    ]
    assert "bookmark" in plan.reason


def test_one_snapshot_after_the_bookmark_is_one_step() -> None:
    plan = plan_replication([s(H2, 2, 20)], [t(H1, 1, 5)], bookmarks=[b(H1, 1, 10)])
    assert [(st.base.full if st.base else None, st.snapshot.name) for st in plan.steps] == [(f"{SRC}#{H1}", H2)]


def test_a_common_snapshot_wins_over_a_bookmark() -> None:
    src = [s(H1, 1, 10), s(H2, 2, 20)]
    plan = plan_replication(src, [t(H1, 1, 5)], bookmarks=[b(H1, 1, 10)])
    assert plan.steps == (Step(StepKind.INCREMENTAL, src[1], base=src[0]),)


def test_a_bookmark_does_not_excuse_a_diverged_target() -> None:
    """The target went on past the bookmarked snapshot with a snapshot the source never had."""
    plan = plan_replication([s(H3, 3, 30)], [t(H1, 1, 5), t(H2, 22, 6)], bookmarks=[b(H1, 1, 10)])
    assert plan.action == Action.DIVERGED
    assert H2 in plan.reason


def test_no_matching_bookmark_is_still_diverged() -> None:
    plan = plan_replication([s(H3, 3, 30)], [t(H1, 1, 5)], bookmarks=[b(H2, 2, 20)])
    assert plan.action == Action.DIVERGED


def test_nothing_newer_than_the_bookmark_is_nothing() -> None:
    plan = plan_replication([], [t(H1, 1, 5)], bookmarks=[b(H1, 1, 10)])
    assert plan.action == Action.NOTHING

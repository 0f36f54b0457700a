"""replicate-all on one node: one batched listing per host for every dataset, then each dataset in turn.

Datasets already in sync cost nothing more than their share of that listing. A dataset with work is locked
and listed again under its lock (the plan must be made under the lock), then sent full and/or incremental
in the same run: no second run is needed as in Hoster. A failure of one dataset (a lost lease included)
stops that dataset only; a failure of the listing itself (target unreachable, host key refused) fails
every dataset of the run, so it reaches the ERROR_ file and the metrics like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hoster_tasks.errors import HosterTasksError, Transient
from hoster_tasks.policy.planner import Action
from hoster_tasks.replication.lifecycle import new_progress, replicate_one
from hoster_tasks.replication.replicator import Replicator, Sides
from hoster_tasks.zfs import ops


def _needs_work(rep: Replicator, dataset: str, sides: Sides) -> bool:
    """True unless the dataset is in sync and its base is already recorded."""
    try:
        plan = rep.plan(dataset, sides)
    except HosterTasksError:
        return True  # re-checked under the lock, where it is reported
    if plan.action is not Action.NOTHING or plan.common is None:
        return plan.action is not Action.NOTHING
    recorded = sides.source_props.get(dataset, {}).get(ops.base_property(rep.endpoint.name), "-")
    return recorded != str(plan.common.guid) or rep.base_unheld(dataset, sides)


def _failed(outcome: dict[str, Any], rep: Replicator, dataset: str, exc: HosterTasksError) -> None:
    rep.record_failure(dataset, str(exc))
    outcome["failed"].append(f"{dataset}: {exc}")
    outcome["failed_datasets"].append(dataset)
    outcome["errors"][dataset] = str(exc)
    outcome["transient"] |= isinstance(exc, Transient)


def replicate_many(rep: Replicator, datasets: Sequence[str]) -> dict[str, Any]:
    outcome: dict[str, Any] = {"results": [], "failed": [], "failed_datasets": [], "errors": {},
                               "transient": False}
    if not datasets:
        return outcome
    try:
        sides = rep.list_sides(datasets)
    except HosterTasksError as exc:
        for ds in datasets:
            _failed(outcome, rep, ds, exc)
        return outcome
    for ds in datasets:
        try:
            outcome["results"].append(replicate_one(rep, ds) if _needs_work(rep, ds, sides)
                                      else {**new_progress(rep, ds), "complete": True})
        except HosterTasksError as exc:
            _failed(outcome, rep, ds, exc)
    return outcome

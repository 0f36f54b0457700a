"""replicate-all on one node: one batched listing per host for every dataset, then each dataset in turn.

Datasets already in sync cost nothing more than their share of that listing. A dataset with work is locked
and listed again under its lock (the plan must be made under the lock), then sent full and/or incremental
in the same run: no second run is needed as in Hoster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hoster_tasks.errors import HosterTasksError, Transient
from hoster_tasks.policy.planner import Action
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


def replicate_one(rep: Replicator, dataset: str) -> dict[str, Any]:
    """Under both locks: plan, send every step, finish. Returns what was done."""
    src_lock, tgt_lock = rep.locks(dataset)
    with src_lock, tgt_lock:
        before, plan, nbytes = rep.prepare(dataset)
        sent: list[str] = []
        seconds = 0.0
        for step in plan.steps:
            src_lock.check()
            tgt_lock.check()
            result = rep.send_step(dataset, step, before)
            sent.append(step.snapshot.name)
            nbytes += result.bytes
            seconds += result.seconds
        after = rep.list_sides([dataset]) if plan.steps else before
        done = rep.finish(dataset, before, after)
    rep.record_success(dataset, nbytes, seconds, done["target_newest_creation"])
    return {"dataset": dataset, "target": rep.endpoint.target_dataset(dataset), "target_host": rep.endpoint.name,
            "action": plan.action.value, "sent": sent, "bytes": nbytes, "seconds": seconds, **done}


def replicate_many(rep: Replicator, datasets: Sequence[str]) -> dict[str, Any]:
    outcome: dict[str, Any] = {"results": [], "failed": [], "failed_datasets": [], "transient": False}
    if not datasets:
        return outcome
    sides = rep.list_sides(datasets)
    for ds in datasets:
        try:
            if _needs_work(rep, ds, sides):
                outcome["results"].append(replicate_one(rep, ds))
            else:
                outcome["results"].append({"dataset": ds, "target": rep.endpoint.target_dataset(ds),
                                           "target_host": rep.endpoint.name, "action": "nothing", "sent": [],
                                           "bytes": 0})
        except HosterTasksError as exc:
            rep.record_failure(ds, str(exc))
            outcome["failed"].append(f"{ds}: {exc}")
            outcome["failed_datasets"].append(ds)
            outcome["transient"] |= isinstance(exc, Transient)
    return outcome

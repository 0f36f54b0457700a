"""replicate-all on one node: one batched listing per host for every dataset, and which of them need work.

Datasets already in sync cost nothing more than their share of that listing. Each dataset with work then
runs its own chain of links (`step | ... | finish`, tasks/chain.py), the same lifecycle as `vm
replicate`: it is locked and listed again under its lock (the plan must be made under the lock), then sent
full and/or incremental in the same run: no second run is needed as in Hoster. A failure of one dataset (a
lost lease included) stops that dataset only; a failure of the listing itself (target unreachable, host key
refused) fails every dataset of the run, so it reaches the ERROR_ file and the metrics like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hoster_tasks.errors import HosterTasksError
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


@dataclass
class Survey:
    """What one listing per host says about a job's datasets."""

    work: list[str] = field(default_factory=list)  # each gets a chain
    in_sync: list[str] = field(default_factory=list)  # nothing to do
    listing_error: HosterTasksError | None = None  # the listing failed: every dataset failed with it


def survey(rep: Replicator, datasets: Sequence[str]) -> Survey:
    out = Survey()
    if not datasets:
        return out
    try:
        sides = rep.list_sides(datasets)
    except HosterTasksError as exc:
        out.listing_error = exc
        return out
    for ds in datasets:
        (out.work if _needs_work(rep, ds, sides) else out.in_sync).append(ds)
    return out

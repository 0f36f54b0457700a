"""One dataset's replication, as one lifecycle both the chain links and replicate-all run.

    advance   under the locks: prepare (resume, plan), then send steps; what a step sends is marked as being
              sent before it starts, and after it the new common base is recorded, held and the copy marked
              ours before the step counts as done: at no line is what the target has prunable on the source
    complete  under the locks: protect the base, prune the target, run the source prunes that snapshot jobs
              deferred while this dataset was replicating

A chain (`vm replicate`, and each dataset of a replicate-all job) runs `advance(max_steps=1)` per link and
`complete` in its last link; a planned move (failover.py) runs `advance()` and `complete` under one hold of
the locks (`replicate_one`), inside its own task.
"""

from __future__ import annotations

from typing import Any

from hoster_tasks.locks import DatasetLock
from hoster_tasks.replication.replicator import Replicator, Sides
from hoster_tasks.settings import Endpoint
from hoster_tasks.snapshots import run_deferred_prunes


def new_progress(endpoint: Endpoint, dataset: str) -> dict[str, Any]:
    """What a run reports (JSON: it travels from chain link to chain link)."""
    return {"dataset": dataset, "target": endpoint.target_dataset(dataset), "target_host": endpoint.name,
            "action": "nothing", "sent": [], "bytes": 0, "seconds": 0.0, "complete": False}


def advance(rep: Replicator, dataset: str, progress: dict[str, Any], max_steps: int | None = None) -> Sides:
    """Send up to `max_steps` steps of a fresh plan (all when None); updates `progress`, returns the sides
    as they are after the last step."""
    sides, plan, resumed = rep.prepare(dataset)
    progress["bytes"] += resumed
    if resumed:  # an interrupted receive finished from its token (send -t): only the rest was sent
        progress["resumed"] = progress.get("resumed", 0) + resumed
    steps = plan.steps if max_steps is None else plan.steps[:max_steps]
    if steps and progress["action"] == "nothing":
        progress["action"] = plan.action.value
    for step in steps:
        rep.mark_sending(dataset, step.snapshot)  # checks the locks first
        result = rep.send_step(dataset, step, sides)
        sides = rep.protect_base(dataset, step.snapshot, sides)
        progress["sent"].append(step.snapshot.name)
        progress["bytes"] += result.bytes
        progress["seconds"] += result.seconds
    progress["complete"] = len(steps) == len(plan.steps)
    return sides


def complete(rep: Replicator, dataset: str, source_lock: DatasetLock, after: Sides | None = None) -> dict[str, Any]:
    """Finish the run (`after`: a listing made after the last transfer; listed here when None); the caller
    records its success."""
    after = after if after is not None else rep.list_sides([dataset])
    if not after.source[dataset]:  # a VM with no snapshot yet: nothing to do, not "nothing in common"
        return {"base": None, "pruned_on_target": [], "target_newest_creation": 0,
                "note": "the source has no snapshots yet"}
    done = rep.finish(dataset, after)
    done["deferred_prunes"] = run_deferred_prunes(rep.ctx, dataset, source_lock)
    return done


def replicate_one(rep: Replicator, dataset: str) -> dict[str, Any]:
    """Under both locks: every step, then complete. Returns what was done."""
    progress = new_progress(rep.endpoint, dataset)
    src_lock, tgt_lock = rep.locks(dataset)
    with src_lock, tgt_lock:
        sides = advance(rep, dataset, progress)
        done = complete(rep, dataset, src_lock, rep.list_sides([dataset]) if progress["sent"] else sides)
    if done["base"] is not None:
        rep.record_success(dataset, progress["bytes"], progress["seconds"], done["target_newest_creation"])
    return {**progress, **done}

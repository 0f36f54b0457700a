"""The links of a replicate-all job: what re-runs a lost one, and how a final failure travels down a lane."""

from __future__ import annotations

from typing import Any

from hoster_tasks import keys
from hoster_tasks.observability.crons import FANOUT_HEADER
from hoster_tasks.requests import FinishRequest, StepRequest
from hoster_tasks.tasks.chain import finish, replicate, step
from hoster_tasks.tasks.replicate_all import replicate_all

JOB = {"id": "job-1", "vms": ["vm1", "vm2"], "speed_limit": 5.0, "script_name": "nightly", "fanout": "f-9"}


def test_a_lost_link_of_a_job_re_runs_the_whole_job_and_the_client_follows_the_job() -> None:
    for task, args in ((step, [None, "pool/vm/vm1", "b1", 5.0, "c1", "job-1", None, JOB]),
                       (finish, [{"dataset": "pool/vm/vm1"}, "pool/vm/vm1", "b1", "c1", "job-1", JOB])):
        again = task.rerun(tuple(args), {})
        assert again.name == replicate_all.name
        assert again.args == ["b1"]
        assert again.kwargs == {"vms": ["vm1", "vm2"], "speed_limit": 5.0, "script_name": "nightly"}
        assert again.follow == "job-1"  # the id the CLI waits on (the chord callback's)
        assert again.headers == {FANOUT_HEADER: "f-9"}  # the re-run reports to the same Crons check-in
        assert again.queue == keys.node_queue(task.settings.node_name)


def test_a_lost_link_of_vm_replicate_re_runs_that_request() -> None:
    again = step.rerun((None, "pool/vm/vm1", "b1", None, "c1", "t-1", None, None), {})
    assert again.name == replicate.name and again.follow == "t-1"


def test_a_failed_links_outcome_is_a_valid_request_of_the_next_link() -> None:
    failed: dict[str, Any] = {"dataset": "pool/vm/vm1", "target": "b/vm/vm1", "target_host": "b1",
                              "action": "incremental", "sent": [], "bytes": 0, "seconds": 0.0,
                              "complete": False, "failed": True}
    FinishRequest.from_call([failed, "pool/vm/vm1", "b1", "c1", "job-1", JOB])
    StepRequest.from_call([failed, "pool/vm/vm1", "b1", None, "c1", "job-1", None, JOB])

"""A running transfer's progress in its replication state hash, for `hoster_tasks_replication_bytes_remaining`.

The replicator calls `update` from the pipeline's pv reader thread (about once a second) and `done` when the
transfer ends, whatever the outcome. Writes are throttled and best effort: progress is for the operator's
eyes, and a Redis hiccup must never fail a transfer that is moving bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from hoster_tasks.observability import state

log = logging.getLogger(__name__)

# the fields this module writes in the replication state hash (appended to what the replicator records)
REMAINING, SENT, TOTAL, UPDATED = "bytes_remaining", "transfer_bytes", "transfer_total", "transfer_updated"
# a report older than this is left over from a worker that died mid-transfer (live ones report every second
# or so, through pv): readers then show nothing remaining
STALE_SECONDS = 120.0
WRITE_EVERY_SECONDS = 1.0


def remaining_of(fields: dict[str, str], now: float) -> float | None:
    """Bytes still to send per the recorded progress: 0 when idle or stale, None while the size is unknown
    (a resumed send has no estimate)."""
    updated = fields.get(UPDATED)
    if not updated or now - float(updated) > STALE_SECONDS:
        return 0.0
    value = fields.get(REMAINING, "0")
    return None if value == "" else max(float(value), 0.0)


class TransferProgress:
    """Records one transfer's sent bytes and estimate, at most once per WRITE_EVERY_SECONDS."""

    def __init__(self, client: redis.Redis, node: str, dataset: str, target: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.node, self.dataset, self.target = client, node, dataset, target
        self.clock = clock
        self._last_write = float("-inf")

    def update(self, sent: int, total: int | None) -> None:
        now = self.clock()
        if now - self._last_write < WRITE_EVERY_SECONDS:
            return
        self._last_write = now
        remaining = "" if not total else str(max(total - sent, 0))  # the estimate may be below the truth
        self._write({REMAINING: remaining, SENT: str(sent), TOTAL: str(total or ""), UPDATED: str(now)}, now)

    def done(self) -> None:
        """Nothing remaining, once any progress was recorded (a transfer that never reported left none)."""
        if self._last_write == float("-inf"):
            return
        now = self.clock()
        self._write({REMAINING: "0", UPDATED: str(now)}, now)

    def _write(self, fields: dict[str, str], now: float) -> None:
        try:
            pipe = self.client.pipeline()
            state.record_replication(pipe, self.node, self.dataset, self.target, fields, {}, now)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - runs in pv's reader thread: raising there would stall the pipe
            log.debug("transfer progress of %s to %s not recorded: %s", self.dataset, self.target, exc)

"""The driver's side of output shards: a shard's rows are committed only once its worker has
committed the shard (the rows wait in the run's control actor until then), the workers' last
shards after the stream, and shards that no row names (a run died before its rows) deleted."""

from __future__ import annotations

import logging
import time
from typing import Any

from svd_batch.accounting import Accounting
from svd_batch.metadata import rows_to_table
from svd_batch.shards import reconcile
from svd_batch.storage import Storage

log = logging.getLogger(__name__)
# How long the driver waits, after the stream, for the workers to commit their last shards.
LAST_SHARD_TIMEOUT_S = 300.0


class ShardCommits:
    def __init__(self, control: Any, tally: Accounting) -> None:
        self.control, self.tally = control, tally

    def take(self) -> int:
        """Commit the rows of the shards workers committed; returns the rows in open shards."""
        import ray

        rows, holding, self.tally.lost_in_shards = ray.get(self.control.take_committed.remote())
        if rows:
            self.tally.commit(rows_to_table(rows))
        return holding

    def last(self) -> None:
        """Ray Data ends the workers after the stream, and each commits its last shard then."""
        give_up = time.monotonic() + LAST_SHARD_TIMEOUT_S
        while self.take() and time.monotonic() < give_up:
            time.sleep(0.2)


def delete_orphans(output: Storage, meta: Storage) -> None:
    deleted = reconcile(output, meta)
    if deleted:
        log.warning("deleted %d shard(s) that no metadata row names (a run died before its rows)", deleted)

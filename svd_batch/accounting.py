"""A run's count of its videos: every video planned ends made (ok or rejected), failed, skipped
or left. Rows are counted as they are committed; at the end, the videos no worker returned
(stalled, or lost with a batch Ray Data gave up on) are written failed and retryable, so the
next run renders them again."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from svd_batch.metadata import MetadataWriter, rows_to_table
from svd_batch.metrics import DriverMetrics
from svd_batch.planning import invalid_row
from svd_batch.schema import ResultRow, Stage, Status, WorkItem


class Accounting:
    def __init__(self, writer: MetadataWriter) -> None:
        self.writer = writer
        self.metrics: DriverMetrics | None = None  # once connected to Ray
        self.counts: Counter[str] = Counter()
        # Failed rows of this run by (error_stage, error_type, retryable), for the summary.
        self.failures: Counter[tuple[str, str, bool]] = Counter()
        self.total = 0  # videos planned so far (planning reports them as it goes)
        self.unread_shards = 0  # WebDataset shards a stopping run left unread, so uncounted
        self.lost_in_shards = 0  # rows lost with a worker's open shard (made, but never committed)

    def commit(self, rows: pa.Table | list[ResultRow]) -> None:
        """Hand rows to the metadata writer, and count them and their failure classes."""
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        self.writer.add(table)
        statuses = Counter(table.column("status").to_pylist())
        self.counts.update(statuses)
        if self.metrics is not None:
            self.metrics.ended(statuses)
        failed = table.filter(pc.equal(table.column("status"), Status.failed.value))
        columns = (failed.column(c).to_pylist() for c in ("error_stage", "error_type", "retryable"))
        self.failures.update((s, t, bool(r)) for s, t, r in zip(*columns, strict=True))

    def planned(self, control: Any) -> Counter[str]:
        """What the plan tasks counted so far, as the run's control actor holds it."""
        import ray

        planned = Counter(ray.get(control.plan_counts.remote()))
        self.total, self.unread_shards = planned["videos"], planned["unread_shards"]
        if planned["skipped"]:
            self.counts["skipped"] = planned["skipped"]
        return planned

    def close(
        self, control: Any, stopped: bool, stalled: str | None, plan_again: Callable[[], Iterable[list[WorkItem]]]
    ) -> None:
        """Account for every planned video. A stopped run leaves those not returned; otherwise
        they are planned once more (`plan_again`: against the ledger with this run's own rows,
        committed first, counted as done) and written failed and retryable."""
        planned = self.planned(control)
        unreturned = self.total - sum(self.counts.values()) - planned["left"]
        if stopped:
            if planned["left"] + unreturned:
                self.counts["left"] += planned["left"] + unreturned
            return
        if not unreturned and not stalled:
            return
        lost = self.lost_in_shards
        reason = stalled or "no worker returned it" + (
            f" ({lost} rows were in the open shards of workers that died)" if lost else ""
        )
        kind = "Stalled" if stalled else "Lost"
        self.writer.flush(must=True)
        for items in plan_again():
            self.commit([_unreturned(item, kind, reason) for item in items])


def _unreturned(item: WorkItem, kind: str, reason: str) -> ResultRow:
    now = dt.datetime.now(dt.UTC)
    if item.error is not None:
        return invalid_row(item, now)
    return ResultRow.for_item(
        item,
        Status.failed,
        error=f"row {item.line} (id {item.id!r}): {Stage.worker}: {reason}; the next run renders it again",
        error_stage=Stage.worker,
        error_type=kind,
        retryable=True,
        ended_at=now,
    )

"""A work item in its worker: its row, made `failed` until the video is written, the request
its render needs (parameters resolved against the model, the image read and fitted), and the
tries of a gated row; and the one-line shape of a row's failure."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from svd_batch.engine.renderer import RenderedVideo, VideoRequest
from svd_batch.errors import first_line, is_retryable
from svd_batch.schema import ResultRow, Stage, Status, TryRecord, WorkItem


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Prepared:
    item: WorkItem
    row: ResultRow
    request: VideoRequest | None = None
    tries: list[TryRecord] = field(default_factory=list)  # of a gated row, so far
    best: tuple[TryRecord, RenderedVideo] | None = None  # the try that missed the fewest gates


def tries(item: WorkItem) -> int:
    """Renders an item may take: its gates' max_tries."""
    return item.params.quality.max_tries if item.params.quality else 1


def fail(p: Prepared, stage: Stage, exc: BaseException) -> None:
    # The same shape as the driver's RowError: row number, id, where it failed, why and the fix.
    row = p.row
    row.error = f"row {p.item.line} (id {p.item.id!r}): {stage}: {first_line(exc, with_type=True)}"
    row.status, row.error_stage, row.error_type, row.ended_at = Status.failed, stage, type(exc).__name__, now()
    row.retryable = is_retryable(exc)

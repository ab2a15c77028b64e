"""Planning as a Ray Data stage: manifest pieces in, blocks of work items out, straight into
the render stage, so the first video renders while the rest of the manifest is being read.

The driver never holds rows. It surveys the manifest (pieces and duplicate ids) and reads
the ledger in tasks of their own, whose answers stay in the object store and reach every
plan task once (`PlanContext`). Each plan task reads and plans its pieces (a JSONL piece over
Arrow columns, columnar.py; keys and seeds always come from plan.Planner), reports what it
counted to the run's JobControl (the driver learns totals, never items), and keeps at most
a window of items ahead of the workers.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from svd_batch.columnar import Counted, Planned, plan_parquet, plan_piece, row_by_row
from svd_batch.ledger import Progress, progress
from svd_batch.manifest import PIECE_BYTES, ManifestError, Piece, is_jsonl, is_parquet, piece_data, read_raw, survey
from svd_batch.plan import Planner, RowError
from svd_batch.samples import Reading
from svd_batch.schema import WORK_SCHEMA, JobSpec, ResultRow, Stage, Status, WorkItem
from svd_batch.storage import StorageError, open_storage

log = logging.getLogger(__name__)
CHUNK = 256  # items a plan task gathers and groups by call key before it hands them on
REPORT_EVERY = 65536  # videos a plan task counts (mostly skipped ones) between reports
BLOCK_BYTES = 32 * 1024
PLAN_CPUS = 0.25  # planning is light; the workers' CPUs stay theirs
PLAN_TASKS = 2  # plan tasks at a time: each is a process of its own, and two keep ahead of the workers


@dataclass(frozen=True)
class PlanContext:
    """What every plan task of a run needs; `earlier` and `duplicates` are ObjectRefs."""

    spec_json: str
    run_id: str
    weights: str
    retry_failed: bool
    earlier: Any  # ledger.Progress
    duplicates: Any  # Survey.duplicates
    control: str | None  # the run's JobControl, told the counts and asked about draining
    # Items planning may have handed on and not seen back. Ray Data's backpressure counts
    # bytes, and work items are tiny: without this bound planning runs the whole manifest
    # ahead into the object store, and a drain then pushes every queued item through a worker.
    window: int = 0


def work_table(items: list[WorkItem]) -> pa.Table:
    return pa.Table.from_pylist([item.model_dump() for item in items], schema=WORK_SCHEMA)


def items_from_table(table: pa.Table) -> list[WorkItem]:
    items = []
    for row in table.to_pylist():
        kept = dict(row.pop("kept") or ())
        if row["error"] is not None:  # no params: built as planning made it, unvalidated
            items.append(WorkItem.model_construct(**row, kept=kept))
        else:
            items.append(WorkItem.model_validate({**row, "kept": kept}))
    return items


def invalid_item(error: RowError, job: str, run_id: str) -> WorkItem:
    """The item of a row that cannot be planned: only what its failed row needs."""
    return WorkItem.model_construct(
        job=job,
        run_id=run_id,
        line=error.line,
        id=error.row_id or f"(row {error.line})",
        video_index=0,
        key=f"invalid/row-{error.line}",
        image="",
        seed=None,
        params=None,
        tags=None,
        kept={},
        error=str(error),
    )


def invalid_row(item: WorkItem, ended_at: dt.datetime) -> ResultRow:
    return ResultRow.for_item(
        item,
        Status.failed,
        error=item.error,
        error_stage=Stage.manifest,
        error_type="InvalidRow",
        retryable=False,
        ended_at=ended_at,
    )


def by_call(items: list[WorkItem]) -> list[WorkItem]:
    """Items of one pipeline call side by side (first seen first), so that blocks cut from
    them are calls the worker can batch."""
    groups: dict[Any, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.params.call_key() if item.error is None else None, []).append(item)
    return [item for group in groups.values() for item in group]


def plan_pieces(batch: pa.Table, context: PlanContext) -> Iterator[pa.Table]:
    """Ray Data map_batches function: the work items of each piece, CHUNK at a time."""
    import ray

    from svd_batch.control import JobControl

    spec = JobSpec.model_validate_json(context.spec_json)
    earlier = ray.get(context.earlier)
    duplicates = frozenset(ray.get(context.duplicates).tolist())
    control = ray.get_actor(JobControl.name(context.run_id)) if context.control else None
    planner = Planner(spec, spec.manifest, context.run_id, context.weights)
    # Asked before the first piece: items handed on before a task knew the run was stopping
    # would start the workers (a model load each) for rows that are then left.
    draining = _hand_on(control, Counter(), 0, context.window, False)

    def drained() -> bool:
        return draining

    for piece in batch.to_pylist():
        chunk: list[WorkItem] = []
        counts: Counter[str] = Counter()
        if draining and piece["uri"].endswith(".tar"):
            # A shard's samples are counted only by reading it whole: a stopping run leaves it
            # unread, as a deadline means (samples.py).
            draining = _hand_on(control, Counter(unread_shards=1), 0, context.window, draining)
            continue
        for planned in _planned(planner, Piece(**piece), duplicates, earlier, context.retry_failed, drained):
            counts["videos"] += planned.videos if isinstance(planned, Counted) else 1
            if isinstance(planned, Counted):
                counts[planned.status] += planned.videos
            elif isinstance(planned, RowError):
                invalid = invalid_item(planned, spec.name, context.run_id)
                # Invalid keys are never done, except for the run's own accounting (Job._account),
                # which counts what this run committed as done.
                if invalid.key not in earlier.done:
                    chunk.append(invalid)
            elif draining:
                counts["left"] += 1  # never handed on: a drained run takes no more rows
            else:
                chunk.append(planned)
            if len(chunk) == CHUNK or counts["videos"] >= REPORT_EVERY:
                draining = _hand_on(control, counts, len(chunk), context.window, draining)
                if chunk:
                    yield work_table(by_call(chunk))
                chunk, counts = [], Counter()
        draining = _hand_on(control, counts, len(chunk), context.window, draining)
        if chunk:
            yield work_table(by_call(chunk))


def _planned(
    planner: Planner,
    piece: Piece,
    duplicates: frozenset[int],
    earlier: Progress,
    retry_failed: bool,
    draining: Callable[[], bool],
) -> Iterator[Planned]:
    if is_jsonl(piece.uri):
        return plan_piece(planner, piece_data(piece), piece.first, duplicates, earlier, retry_failed, draining)
    if is_parquet(piece.uri):
        return plan_parquet(planner, piece, duplicates, earlier, retry_failed, draining)
    return row_by_row(planner, read_raw(piece, Reading.for_spec(planner.spec)), duplicates, earlier, retry_failed)


def _hand_on(control: Any, counts: Counter[str], items: int, window: int, draining: bool) -> bool:
    """Report the counts, and wait while `window` items are out already; returns draining."""
    import time

    import ray

    if control is None:
        return draining
    try:
        draining, ahead = ray.get(control.planned.remote({**counts, "handed": items}))
        while not draining and ahead > window:
            time.sleep(0.2)
            draining, ahead = ray.get(control.planned.remote({}))
    except ray.exceptions.RayActorError:  # gone with its node: plan on, as the workers do
        pass
    return draining


def plan_dataset(spec: JobSpec, pieces: list[Piece], context: PlanContext) -> Any:
    """The planning stage; its blocks hold one pipeline call each (workers.batch_size items):
    Ray Data hands a whole block to one worker, so small blocks share the work evenly."""
    import ray

    pieces_ds = ray.data.from_items([asdict(p) for p in pieces], override_num_blocks=len(pieces))
    # Ray Data holds a task's output until it makes a block of target_max_block_size (128 MiB by
    # default): far more work items than a piece has, so nothing would reach a worker before
    # its piece was planned. A chunk of items is a few hundred KiB, so each one goes on at once.
    pieces_ds.context.target_max_block_size = BLOCK_BYTES
    return pieces_ds.map_batches(
        plan_pieces,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"context": context},
        num_cpus=PLAN_CPUS,
        concurrency=min(PLAN_TASKS, len(pieces)),  # more than it has inputs, and Ray Data warns
    ).repartition(target_num_rows_per_block=spec.workers.batch_size)


def _survey(uri: str, piece_bytes: int, reading: Reading) -> tuple[list[Piece], Any, str | None]:
    try:
        found = survey(uri, piece_bytes, reading)
    except (StorageError, ManifestError) as exc:
        return [], None, str(exc)
    return found.pieces, found.duplicates, None


class _Warnings(logging.Handler):
    """The warnings a task logs (a corrupt part, say), for the driver to log where users see them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _earlier(
    meta: str, formats: list[str], outputs: str | None, exclude_run: str | None
) -> tuple[Any, str | None, list[str]]:
    caught, logger = _Warnings(), logging.getLogger("svd_batch")
    logger.addHandler(caught)
    try:
        earlier = progress(open_storage(meta), formats, open_storage(outputs) if outputs else None, exclude_run)
        return earlier, None, caught.lines
    except StorageError as exc:
        return None, f"metadata {meta}: {exc}", caught.lines
    finally:
        logger.removeHandler(caught)


class PlanError(RuntimeError):
    """Planning cannot start (the manifest or the metadata cannot be read); one line."""


def prepare(
    spec: JobSpec,
    run_id: str,
    weights: str,
    retry_failed: bool = False,
    verify_outputs: bool = False,
    exclude_run: str | None = None,
    piece_bytes: int | None = None,
) -> tuple[list[Piece], PlanContext]:
    """Survey the manifest and read the ledger, each in a task of its own, so that neither
    ids nor keys pass through the driver: it keeps the pieces and two ObjectRefs.

    `exclude_run`: keys that run produced count as done (its own accounting, Job._account)."""
    import ray

    task = ray.remote(num_cpus=PLAN_CPUS)
    pieces, duplicates, problem = (
        task(_survey).options(num_returns=3).remote(spec.manifest, piece_bytes or PIECE_BYTES, Reading.for_spec(spec))
    )
    outputs = spec.output if verify_outputs else None
    earlier, trouble, warnings = (
        task(_earlier).options(num_returns=3).remote(spec.metadata_uri, spec.made, outputs, exclude_run)
    )
    for line in ray.get(warnings):
        log.warning("%s", line)
    for error in ray.get([problem, trouble]):
        if error:
            raise PlanError(error)
    control = run_id if exclude_run is None else None
    window = 2 * CHUNK + 4 * spec.workers.count * spec.workers.batch_size
    context = PlanContext(spec.model_dump_json(), run_id, weights, retry_failed, earlier, duplicates, control, window)
    return ray.get(pieces), context


def plan_again(
    spec: JobSpec, run_id: str, weights: str, retry_failed: bool, verify_outputs: bool
) -> Iterator[list[WorkItem]]:
    """Every video planned once more, against the ledger with this run's own rows counted as
    done: what is still to do is what no worker returned (accounting.py)."""
    pieces, context = prepare(spec, run_id, weights, retry_failed, verify_outputs, exclude_run=run_id)
    for work in plan_dataset(spec, pieces, context).iter_batches(batch_size=None, batch_format="pyarrow"):
        yield items_from_table(work)

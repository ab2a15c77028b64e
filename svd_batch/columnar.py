"""Planning a JSONL piece over Arrow columns: on a rerun most rows are done, and deciding that
row by row in Python (parse, validate, resolve, look up) is what made planning slow.

pyarrow reads the piece (manifest.read_table). A row whose every column has a type that it
reads exactly as the per-row reader would, and whose values cannot fail validation (checked
with Arrow compute; each distinct parameter set is validated once, the image folder checked
once), gets its keys from plan.Planner's own parts, and all of the piece's keys are looked
up in one vectorised search. Such a row is decided here when an earlier run made all of its
videos (skipped) or, once the run is stopping, none of them (left). Every other row, to
render or unusual in any way, is read from its own line by the per-row path
(manifest.jsonl_row, manifest.validate, Planner.plan), so its work items and errors are
exactly that path's. A piece that pyarrow might read differently takes that path whole.
"""

from __future__ import annotations

import functools
import io
import typing
from collections.abc import Callable, Collection, Iterator
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from svd_batch.hashes import string_hashes
from svd_batch.ledger import Progress
from svd_batch.manifest import (
    Piece,
    Raw,
    jsonl_row,
    jsonl_rows,
    lines_of,
    parquet_record,
    parquet_table,
    read_raw,
    read_table,
    validate,
)
from svd_batch.plan import MAX_SEED, Planner, RowError, derive_seed, freeze, join_uri, safe_name
from svd_batch.samples import Reading
from svd_batch.schema import RENDER_FIELDS, RenderParams, WorkItem

PENDING = 256  # rows to plan row by row that are read before their items are handed on

_SCALAR = (pa.types.is_string, pa.types.is_int64, pa.types.is_float64, pa.types.is_boolean, pa.types.is_null)
_MAX_SIMPLE_SEED = MAX_SEED - 63  # seed + any video index stays an int64


def _field_type(name: str) -> Any:
    annotation = RenderParams.model_fields[name].annotation
    while typing.get_origin(annotation) in (typing.Union, typing.Annotated, type(int | None)):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) or annotation


def _reads_exactly(name: str, kind: pa.DataType) -> bool:
    """Whether an override column of this Arrow type gives the values that json.loads would
    (pyarrow makes a column double if any of its numbers is, so ints only where exact)."""
    wanted = _field_type(name)
    if wanted is int:
        return pa.types.is_int64(kind)
    if wanted is float:
        return pa.types.is_int64(kind) or pa.types.is_float64(kind)
    if wanted is list:
        item = kind.value_type if pa.types.is_list(kind) else None
        return item is not None and (pa.types.is_int64(item) or pa.types.is_float64(item) or pa.types.is_null(item))
    return pa.types.is_string(kind) and (wanted is str or issubclass(wanted, Enum))


def _mask(condition: pa.ChunkedArray, null: bool) -> np.ndarray:
    return condition.fill_null(null).to_numpy(zero_copy_only=False)


def _simple(
    table: pa.Table, numbers: np.ndarray, duplicates: Collection[int], passthrough: Collection[str]
) -> np.ndarray:
    """Rows that are certainly valid in the per-row reader, as far as single columns tell."""
    names = set(table.column_names)
    if "id" not in names or "image" not in names:
        return np.zeros(table.num_rows, bool)
    row_id, image = table.column("id"), table.column("image")
    if not pa.types.is_string(image.type) or not (pa.types.is_string(row_id.type) or pa.types.is_int64(row_id.type)):
        return np.zeros(table.num_rows, bool)
    simple = ~np.isin(numbers, np.fromiter(duplicates, np.int64, len(duplicates)))
    simple &= _mask(pc.greater_equal(pc.utf8_length(image), 1), null=False)
    if pa.types.is_string(row_id.type):
        length = pc.utf8_length(row_id)
        simple &= _mask(pc.and_(pc.greater_equal(length, 1), pc.less_equal(length, 1024)), null=False)
        simple &= ~_mask(pc.match_substring(row_id, "\x00"), null=True)
    else:
        simple &= _mask(row_id.is_valid(), null=False)
    for name in names - {"id", "image"}:
        column = table.column(name)
        kind = column.type
        if name == "seed" and pa.types.is_int64(kind):
            simple &= _mask(pc.and_(pc.greater_equal(column, 0), pc.less_equal(column, _MAX_SIMPLE_SEED)), null=True)
        elif name == "tags" and pa.types.is_struct(kind) and all(any(t(f.type) for t in _SCALAR) for f in kind):
            continue
        elif name == "caption" and pa.types.is_string(kind):
            continue  # any text is a caption, and no caption is in the key
        elif name in passthrough and any(t(kind) for t in _SCALAR):
            continue  # carried as it is: any JSON scalar passes, and none is in the key
        elif not (pa.types.is_null(kind) or (name in RENDER_FIELDS and _reads_exactly(name, kind))):
            simple &= ~_mask(column.is_valid(), null=False)  # a column to check row by row
    return simple


_ODD_REF = r"^/|//|(^|/)\.\.?(/|$)|/$"  # absolute, or changed by normpath: joined row by row
_SAFE_ID = r"^[A-Za-z0-9-]([A-Za-z0-9._-]{0,62}[A-Za-z0-9-])?$"  # plan.safe_name leaves it as it is


def video_keys(planner: Planner, picked: pa.Table) -> tuple[list[str], list[int], list[int]]:
    """The keys of the picked rows' videos, which row each is of, and the rows that turn out
    invalid (a parameter set, an image or latents path that fails): those go row by row."""
    ids = picked.column("id").cast(pa.string())
    refs = picked.column("image")
    prefix = join_uri(planner.base, "x")[:-1]
    joinable = planner.inputs.covers(prefix)
    plain_ref = (~_mask(pc.match_substring_regex(refs, _ODD_REF), null=True)).tolist()
    safe = _mask(pc.match_substring_regex(ids, _SAFE_ID), null=False).tolist()
    seeds = picked.column("seed").to_pylist() if "seed" in picked.column_names else [None] * picked.num_rows
    present = [name for name in RENDER_FIELDS if name in picked.column_names]
    values = zip(*(picked.column(name).to_pylist() for name in present), strict=True) if present else None
    points = planner.sweep_points or [("", {})]

    @functools.cache
    def settings(own: tuple[tuple[str, Any], ...]) -> list[tuple[str, int, str]]:
        """Per sweep point: its label, videos and parameters (JSON); raises a RowError."""
        found = []
        for label, combo in points:
            merged = {**dict(own), **{k: freeze(v) for k, v in combo.items()}}
            params, params_json = planner.params(
                0, label, tuple(sorted((k, v) for k, v in merged.items() if v is not None))
            )
            if params.latents is not None:
                planner.checked(0, label, "latents", params.latents)
            found.append((label, params.num_videos_per_prompt, params_json))
        return found

    job_seed = planner.spec.seed
    keys: list[str] = []
    owner: list[int] = []
    invalid: list[int] = []
    for at, (row_id, ref, row_seed) in enumerate(zip(ids.to_pylist(), refs.to_pylist(), seeds, strict=True)):
        own = (
            tuple((k, freeze(v)) for k, v in zip(present, next(values), strict=True) if v is not None) if values else ()
        )
        try:
            image = (
                prefix + ref
                if joinable and plain_ref[at]
                else planner.checked(0, row_id, "image", join_uri(planner.base, ref))
            )
            row_keys = []
            for label, videos, params_json in settings(own):
                video_id = f"{row_id}[{label}]" if label else row_id
                seed = row_seed if row_seed is not None else derive_seed(job_seed, video_id)
                name = video_id if safe[at] and not label else safe_name(video_id)
                stem = planner.stem(video_id, name, image, seed, params_json)
                row_keys += [f"{stem}-v{v}" for v in range(videos)]
        except RowError:
            invalid.append(at)
            continue
        keys += row_keys
        owner += [at] * len(row_keys)
    return keys, owner, invalid


def decided(
    planner: Planner, table: pa.Table, numbers: np.ndarray, duplicates: Collection[int], earlier: Progress,
    retry_failed: bool,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per row, its videos where columns alone tell (0: the row is planned row by row), and
    how many of them an earlier run made."""
    rows = np.flatnonzero(_simple(table, numbers, duplicates, planner.spec.passthrough))
    videos, made = np.zeros(len(numbers), np.int64), np.zeros(len(numbers), np.int64)
    if not len(rows):
        return videos, made
    keys, owner, invalid = video_keys(planner, table.take(pa.array(rows)))
    hashes = string_hashes(keys)
    found = earlier.done.has(hashes)
    if not retry_failed:
        found |= earlier.final.has(hashes)
    owners = np.asarray(owner, np.int64)
    counts = np.bincount(owners, minlength=len(rows))
    counts[invalid] = 0
    videos[rows] = counts
    made[rows] = np.bincount(owners, weights=found, minlength=len(rows))
    return videos, made


class Counted(NamedTuple):
    """Videos that need no work item: `skipped` (an earlier run made them) or `left` (a run
    that is stopping counts, and hands on nothing)."""

    status: str
    videos: int


Planned = WorkItem | RowError | Counted


def plan_piece(
    planner: Planner,
    data: bytes,
    first: int,
    duplicates: Collection[int],
    earlier: Progress,
    retry_failed: bool,
    draining: Callable[[], bool],
) -> Iterator[Planned]:
    """What Planner.plan makes of a JSONL piece's rows, in order, except that rows decided over
    columns come as counts: those an earlier run made, and, once `draining()`, those left."""
    lines = lines_of(data, first)
    table = read_table(data, lines)
    if table is None:
        yield from row_by_row(planner, jsonl_rows(io.BytesIO(data), first), duplicates, earlier, retry_failed)
        return

    def raw(at: int, number: int) -> Raw:
        return jsonl_row(number, data[lines.starts[at] : lines.stops[at]].decode())

    yield from _plan_table(planner, table, lines.numbers, raw, duplicates, earlier, retry_failed, draining)


def plan_parquet(
    planner: Planner,
    piece: Piece,
    duplicates: Collection[int],
    earlier: Progress,
    retry_failed: bool,
    draining: Callable[[], bool],
) -> Iterator[Planned]:
    """`plan_piece` for a Parquet piece: its row groups as the table, a row's cells as its raw row."""
    reading = Reading.for_spec(planner.spec)
    table = parquet_table(piece, reading)
    if table is None:
        yield from row_by_row(planner, read_raw(piece, reading), duplicates, earlier, retry_failed)
        return

    def raw(at: int, number: int) -> Raw:
        return parquet_record(table, at, number, piece.uri, reading)

    numbers = piece.first + np.arange(table.num_rows)
    yield from _plan_table(planner, table, numbers, raw, duplicates, earlier, retry_failed, draining)


def _plan_table(
    planner: Planner,
    table: pa.Table,
    numbers: np.ndarray,
    raw: Callable[[int, int], Raw],
    duplicates: Collection[int],
    earlier: Progress,
    retry_failed: bool,
    draining: Callable[[], bool],
) -> Iterator[Planned]:
    """`raw(at, number)`: row `at` as the per-row reader reads it, for the rows columns leave open."""
    videos, made = decided(planner, table, numbers, duplicates, earlier, retry_failed)
    pending: list[tuple[int, Raw]] = []
    run = Counted("skipped", 0)  # side by side rows of one status, handed on as one count
    for at, (count, done) in enumerate(zip(videos.tolist(), made.tolist(), strict=True)):
        if count and done == count:
            status: str | None = "skipped"
        elif count and not done and draining():
            status = "left"
        else:
            status = None  # row by row, which also tells apart the videos of a partly made row
        if status is not None and pending:
            yield from row_by_row(planner, pending, duplicates, earlier, retry_failed)
            pending = []
        if run.videos and status != run.status:
            yield run
            run = Counted("skipped", 0)
        if status is not None:
            run = Counted(status, run.videos + count)
            continue
        number = int(numbers[at])
        pending.append((number, raw(at, number)))
        if len(pending) == PENDING:
            yield from row_by_row(planner, pending, duplicates, earlier, retry_failed)
            pending = []
    yield from row_by_row(planner, pending, duplicates, earlier, retry_failed)
    if run.videos:
        yield run


def row_by_row(
    planner: Planner, rows: Any, duplicates: Collection[int], earlier: Progress, retry_failed: bool
) -> Iterator[Planned]:
    validated = ((number, validate(number, raw, duplicates, planner.spec.passthrough)) for number, raw in rows)
    for planned in planner.plan(validated, earlier, retry_failed):
        yield Counted("skipped", 1) if planned is None else planned

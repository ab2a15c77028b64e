"""Stream manifest rows (JSONL, CSV or Parquet; local or s3://) and validate each one.

Rows are read one at a time, or a JSONL piece at a time as Arrow columns (read_table, which
declines any piece it might read differently), so a manifest of millions of rows never sits
whole in memory. Every problem is reported as a RowError naming the row number, the id, the
field and a fix; a bad row never stops the rows after it.

A manifest is read in pieces, so that pieces can be planned in parallel (planning.py): the
survey cuts a JSONL file at line ends every PIECE_BYTES (CSV cells may hold line breaks, and
Parquet needs the whole file, so those are one piece) and finds the rows whose id an earlier
row already has, which no single piece could know.
"""

from __future__ import annotations

import array
import contextlib
import csv
import io
import json
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
from pydantic import ValidationError

from svd_batch.errors import first_line
from svd_batch.hashes import string_hashes
from svd_batch.plan import RowError
from svd_batch.samples import SHARD_ROWS, Reading, image_cell, is_webdataset, shard_rows, shards
from svd_batch.schema import RENDER_FIELDS, ManifestRow, explain
from svd_batch.storage import RangedReader, StorageError, local_path, s3_body, split_s3

PARQUET_BATCH = 4096
PIECE_BYTES = 8 << 20
PIECE_ROWS = 1 << 17  # Parquet rows a piece holds at most (about a JSONL piece's), whole row groups
# Rows are small (an id, a path, a few tags); a larger one is a mistake, such as a whole
# caption file pasted into a tag, and would be copied into every metadata row it makes.
MAX_ROW_CHARS = 64 * 1024
Raw = dict[str, Any] | RowError
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = np.array([9, 10, 13, 32], np.uint8)  # what JSON allows between values
_NULL_KEY = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*null')
_NULLABLE = frozenset({"seed", "caption", *RENDER_FIELDS}).__contains__  # null there means absent


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a manifest (end None: to its end), whose first line is line `first`;
    of a Parquet manifest, its row groups [start, end), whose first row is row `first`."""

    uri: str
    start: int = 0
    end: int | None = None
    first: int = 1


def _local(uri: str) -> Path:
    path = local_path(uri)
    if not path.is_file():
        raise StorageError(f"manifest {path} does not exist; fix `manifest:` in the job spec")
    return path


@contextmanager
def _binary(piece: Piece) -> Iterator[io.BufferedIOBase]:
    uri = piece.uri
    if uri.startswith("s3://"):
        body = s3_body(uri, piece.start, piece.end)
        try:
            yield body
        finally:
            body.close()
        return
    with _local(uri).open("rb") as handle:
        if piece.start or piece.end is not None:
            handle.seek(piece.start)
            yield io.BytesIO(handle.read(-1 if piece.end is None else piece.end - piece.start))
        else:
            yield handle


def _too_big(number: int) -> RowError:
    reason = f"row is larger than {MAX_ROW_CHARS:,} characters; keep tags short, store data elsewhere"
    return RowError(number, None, "(line)", reason)


def _lines(text: io.TextIOBase) -> Iterator[str | None]:
    """Lines, or None for a line too long to hold: it is read past, never kept in memory."""
    while line := text.readline(MAX_ROW_CHARS + 1):
        if len(line) <= MAX_ROW_CHARS or line.endswith("\n"):
            yield line
            continue
        while (rest := text.readline(MAX_ROW_CHARS)) and not rest.endswith("\n"):
            pass
        yield None


def _text(stream: io.BufferedIOBase, newline: str | None) -> io.TextIOWrapper:
    # utf-8-sig drops a byte-order mark. An invalid byte becomes a lone surrogate instead of
    # ending the stream, so it fails its own row only (see _not_text).
    return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _not_text(value: Any, where: str = "") -> str | None:
    """Where a value holds something that is not text: a byte that was not UTF-8, or a lone
    surrogate (JSON allows the escape \\ud800; no UTF-8 file or Parquet column can hold it)."""
    if isinstance(value, str):
        if found := _SURROGATE.search(value):
            code, column = ord(found.group()), found.start() + 1
            if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
                reason = f"byte 0x{code - 0xDC00:02X} at column {column} is not UTF-8; save the manifest as UTF-8"
                return f"{where or '(line)'}: {reason}"
            reason = f"lone surrogate U+{code:04X} at column {column}; write the character itself"
            return f"{where or '(line)'}: {reason}"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _not_text(key, where) or _not_text(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if found := _not_text(item, f"{where}[{index}]"):
                return found
    return None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply (more than about 1000 levels); rows hold flat values") from None


def jsonl_rows(stream: io.BufferedIOBase, first: int = 1) -> Iterator[tuple[int, Raw]]:
    # newline=None accepts \n, \r\n and \r alike.
    for number, line in enumerate(_lines(_text(stream, newline=None)), start=first):
        if (raw := jsonl_row(number, line)) is not None:
            yield number, raw


def jsonl_row(number: int, line: str | None) -> Raw | None:
    """One JSONL line (None: too long to hold) as a raw row, or None for a blank line."""
    if line is None:
        return _too_big(number)
    if not line.strip():
        return None
    if bad := _not_text(line):
        return _row_error(number, bad)
    try:
        value = _parse_json(line)
    except json.JSONDecodeError as exc:
        return RowError(number, None, "(line)", f"not valid JSON ({exc.msg} at column {exc.colno})")
    except ValueError as exc:
        return RowError(number, None, "(line)", str(exc))
    if not isinstance(value, dict):
        return RowError(number, None, "(line)", 'a row must be a JSON object: {"id": ..., "image": ...}')
    return value


def _row_error(number: int, problem: str) -> RowError:
    field, _, reason = problem.partition(": ")
    return RowError(number, None, field, reason)


def _csv_cell(value: str | None) -> Any:
    if value is None or value == "":
        return None
    if value[:1] in "[{":  # lists (sigmas) and objects (tags) are written as JSON in a cell
        try:
            return _parse_json(value)
        except json.JSONDecodeError:
            return value
    return value


def _csv(stream: io.BufferedIOBase) -> Iterator[tuple[int, Raw]]:
    text = _text(stream, newline="")
    csv.field_size_limit(MAX_ROW_CHARS)
    reader = csv.DictReader(text)
    while True:
        last = reader.line_num
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader goes on at the next row
            if "field limit" in str(exc):
                yield last + 1, _too_big(last + 1)
            else:
                yield last + 1, RowError(last + 1, None, "(line)", f"not valid CSV ({exc}); quote the cell")
            continue
        number = reader.line_num  # the physical line, so quoted multi-line cells still point right
        if None in record:
            yield (
                number,
                RowError(number, record.get("id"), "(line)", "more cells than columns; quote cells with commas"),
            )
            continue
        try:
            cells = {key: _csv_cell(value) for key, value in record.items()}
        except ValueError as exc:
            yield number, RowError(number, record.get("id"), "(line)", str(exc))
            continue
        yield number, {key: value for key, value in cells.items() if value is not None}


@contextmanager
def _parquet_file(uri: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    def opened(source: Any) -> Any:
        try:
            return pq.ParquetFile(source)
        except pa.ArrowException as exc:
            raise ManifestError(
                f"manifest {uri} is not a Parquet file ({first_line(exc)}); write it with a Parquet writer"
            ) from None

    if uri.startswith("s3://"):
        with io.BufferedReader(RangedReader(uri), 1 << 20) as source:
            yield opened(source)
        return
    yield opened(_local(uri))


def _row_groups(piece: Piece, groups: int) -> list[int]:
    return list(range(piece.start, groups if piece.end is None else piece.end))


def parquet_record(batch: pa.Table | pa.RecordBatch, index: int, number: int, uri: str, reading: Reading) -> Raw:
    """Row `index` of the batch as the per-row reader sees it: a null cell is an absent key; an
    image held as bytes renders from them (samples.image_cell)."""
    try:
        (record,) = batch.slice(index, 1).to_pylist()
    except UnicodeDecodeError as exc:  # a string column holding bytes that are not UTF-8
        reason = f"byte 0x{exc.object[exc.start]:02X} is not UTF-8; write the column as UTF-8 strings"
        return RowError(number, None, "(row)", reason)
    return image_cell({key: value for key, value in record.items() if value is not None}, uri, number, reading)


def _parquet(piece: Piece, reading: Reading) -> Iterator[tuple[int, Raw]]:
    number = piece.first
    with _parquet_file(piece.uri) as parquet:
        groups = _row_groups(piece, parquet.num_row_groups)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups):
            for index in range(batch.num_rows):
                yield number, parquet_record(batch, index, number, piece.uri, reading)
                number += 1


def parquet_table(piece: Piece, reading: Reading | None = None, columns: list[str] | None = None) -> pa.Table | None:
    """The piece's row groups as one table, or None where a string is not UTF-8 (Parquet does
    not check on write; the per-row reader fails those rows alone). Columns are widened to
    the types columnar planning reads (polars writes large strings, pandas categories as
    dictionaries, numpy int32 and float32): each cell's Python value stays what it was."""
    with _parquet_file(piece.uri) as parquet:
        if columns is not None:
            columns = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read_row_groups(_row_groups(piece, parquet.num_row_groups), columns, use_threads=False)
    try:
        table.validate(full=True)
    except pa.ArrowInvalid:
        return None
    if (named := (reading or Reading()).samples.id) != "id" and named in table.column_names:
        table = table.drop_columns([c for c in table.column_names if c == "id"])
        table = table.rename_columns(["id" if c == named else c for c in table.column_names])
    for at, field in enumerate(table.schema):
        wide = _wide(field.type)
        if wide != field.type:
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a uint64 past int64, say
                table = table.set_column(at, field.name, table.column(at).cast(wide))
    return table


def _wide(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(kind):
        return _wide(kind.value_type)
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_integer(kind):
        return pa.int64()
    if pa.types.is_floating(kind):
        return pa.float64()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind):
        return pa.list_(_wide(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_wide(f.type)) for f in kind])
    return kind


def _parquet_pieces(uri: str) -> list[Piece]:
    """Runs of whole row groups of at most PIECE_ROWS rows and PIECE_BYTES of data (images in
    a column make few rows many bytes); a larger group is a piece alone."""
    with _parquet_file(uri) as parquet:
        groups = [parquet.metadata.row_group(g) for g in range(parquet.num_row_groups)]
    pieces, start, first, rows, size = [], 0, 1, 0, 0
    for at, group in enumerate(groups):
        if rows and (rows + group.num_rows > PIECE_ROWS or size + group.total_byte_size > PIECE_BYTES):
            pieces.append(Piece(uri, start, at, first))
            start, first, rows, size = at, first + rows, 0, 0
        rows, size = rows + group.num_rows, size + group.total_byte_size
    return [*pieces, Piece(uri, start, len(groups), first)]


def _suffix(uri: str) -> str:
    suffix = Path(split_s3(uri)[1] if uri.startswith("s3://") else uri).suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".tar"):
        reason = "use .jsonl, .csv, .parquet or WebDataset .tar shards"
        raise StorageError(f"manifest {uri}: unknown format {suffix!r}; {reason}")
    return suffix


def read_raw(piece: Piece, reading: Reading | None = None) -> Iterator[tuple[int, Raw]]:
    """(row number, raw row or the reason it could not be parsed), streaming."""
    reading = reading or Reading()
    if piece.uri.endswith(".tar"):  # one WebDataset shard
        yield from shard_rows(piece.uri, piece.first, reading)
        return
    if is_parquet(piece.uri):
        yield from _parquet(piece, reading)
        return
    with _binary(piece) as stream:
        if _suffix(piece.uri) == ".csv":
            yield from _csv(stream)
        else:
            yield from jsonl_rows(stream, piece.first)


@dataclass(frozen=True)
class Lines:
    """The piece's lines that hold something: byte ranges and line numbers."""

    starts: np.ndarray
    stops: np.ndarray
    numbers: np.ndarray


def lines_of(data: bytes, first: int) -> Lines:
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [len(buf)]))
    # A line that starts with what JSON calls whitespace is rare; only those are looked at whole.
    keep = stops > starts
    keep[keep] = ~np.isin(buf[starts[keep]], _WHITESPACE)
    for at in np.flatnonzero(~keep & (stops > starts)):
        keep[at] = bool(data[starts[at] : stops[at]].strip(b" \t\r\n"))
    return Lines(starts[keep], stops[keep], first + np.flatnonzero(keep))


def read_table(data: bytes, lines: Lines) -> pa.Table | None:
    """The piece as Arrow columns, or None where pyarrow's reading could differ from the
    per-row reader's."""
    if not len(lines.numbers) or data.startswith(b"\xef\xbb\xbf") or data.count(b"\r") != data.count(b"\r\n"):
        return None
    if (lines.stops - lines.starts).max() > MAX_ROW_CHARS:
        return None
    if b"null" in data and not all(_NULLABLE(k.group(1).decode(errors="replace")) for k in _NULL_KEY.finditer(data)):
        return None
    try:
        data.decode()  # pyarrow does not check that strings are UTF-8
        options = pj.ReadOptions(use_threads=False, block_size=len(data) + 1)  # one block: one type a column
        table = pj.read_json(io.BytesIO(data), read_options=options)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # Two objects on one line are two rows to pyarrow and one bad line to the per-row reader.
    return table if table.num_rows == len(lines.numbers) else None


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (as opposed to one of its rows)."""


@dataclass(frozen=True)
class Survey:
    pieces: list[Piece]
    duplicates: np.ndarray  # row numbers whose id an earlier row has (sorted int64)


def _lines_in(data: bytes) -> int:
    # What a universal-newline reader counts: \n, \r\n and a lone \r each end a line.
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _cut(uri: str, size: int) -> Iterator[tuple[Piece, bytes]]:
    start, first, pending = 0, 1, b""
    with _binary(Piece(uri)) as stream:
        while block := stream.read(size):
            pending += block
            end = pending.rfind(b"\n") + 1  # never inside \r\n, and a piece ends a line
            if not end:
                continue
            yield Piece(uri, start, start + end, first), pending[:end]
            start, first, pending = start + end, first + _lines_in(pending[:end]), pending[end:]
    if pending or not start:
        yield Piece(uri, start, None, first), pending


def cut(uri: str, size: int) -> list[Piece]:
    return [piece for piece, _ in _cut(uri, size)]


def is_jsonl(uri: str) -> bool:
    return _suffix(uri) in (".jsonl", ".ndjson", ".json")


def is_parquet(uri: str) -> bool:
    return _suffix(uri) == ".parquet"


def piece_data(piece: Piece) -> bytes:
    with _binary(piece) as stream:
        return stream.read()


def _ids(rows: Iterator[tuple[int, Raw]]) -> tuple[np.ndarray, list[int], int]:
    ids, numbers, count = [], [], 0
    for number, raw in rows:
        count += 1
        value = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            ids.append(value)
            numbers.append(number)
    return string_hashes(ids), numbers, count


def _table_ids(table: pa.Table, numbers: np.ndarray) -> tuple[np.ndarray, list[int], int] | None:
    """The id hashes and row numbers of a piece read as Arrow columns, and its row count; None
    where the ids are not read exactly (strings or int64)."""
    if "id" not in table.column_names:
        return string_hashes([]), [], table.num_rows
    ids = table.column("id")
    if not (pa.types.is_string(ids.type) or pa.types.is_int64(ids.type)):
        return None
    present = ids.is_valid()
    hashes = string_hashes(ids.filter(present).cast(pa.string()))
    return hashes, numbers[present.to_numpy(zero_copy_only=False)].tolist(), table.num_rows


def _piece_ids(data: bytes, first: int) -> tuple[np.ndarray, list[int], int]:
    lines = lines_of(data, first)
    table = read_table(data, lines)
    found = _table_ids(table, lines.numbers) if table is not None else None
    return _ids(jsonl_rows(io.BytesIO(data), first)) if found is None else found


def _parquet_ids(piece: Piece, reading: Reading) -> tuple[np.ndarray, list[int], int]:
    table = parquet_table(piece, reading, columns=[reading.samples.id])  # never the images
    found = _table_ids(table, piece.first + np.arange(table.num_rows)) if table is not None else None
    return _ids(read_raw(piece, reading)) if found is None else found


def survey(uri: str, piece_bytes: int = PIECE_BYTES, reading: Reading | None = None) -> Survey:
    """The manifest's pieces, and its duplicate ids: a row whose id an earlier row has (valid
    or not) is the duplicate, so the answer never depends on how the manifest was cut.
    One read of the manifest; of WebDataset shards, only their listing (samples.py)."""
    reading = reading or Reading()
    if is_webdataset(uri):
        found = shards(uri)
        if not found:
            raise ManifestError(f"manifest {uri} names no .tar shards; fix `manifest:` (a pattern, a folder or a .tar)")
        pieces = [Piece(shard, first=at * SHARD_ROWS + 1) for at, shard in enumerate(found)]
        return Survey(pieces, np.zeros(0, np.int64))
    hashes, numbers = [], array.array("q")
    pieces, rows = [], 0
    if is_jsonl(uri):
        parts: Iterator[tuple[Piece, Any]] = ((p, _piece_ids(data, p.first)) for p, data in _cut(uri, piece_bytes))
    elif is_parquet(uri):
        parts = ((p, _parquet_ids(p, reading)) for p in _parquet_pieces(uri))
    else:  # CSV: one piece, as a quoted cell may hold a line end, so no byte tells where rows end
        parts = iter([(Piece(uri), _ids(read_raw(Piece(uri), reading)))])
    for piece, (found, at, count) in parts:
        pieces.append(piece)
        hashes.append(found)
        numbers.extend(at)
        rows += count
    if not rows:
        raise ManifestError(f"manifest {uri} has no rows; add one JSON object (or CSV/Parquet row) per input image")
    keyed = np.concatenate(hashes)
    later = np.ones(len(keyed), bool)
    later[np.unique(keyed, return_index=True)[1]] = False  # the first row of each id
    return Survey(pieces, np.sort(np.frombuffer(numbers, np.int64)[later]))


def read_piece(
    piece: Piece, duplicates: Collection[int], passthrough: Collection[str] = (), reading: Reading | None = None
) -> Iterator[tuple[int, ManifestRow | RowError]]:
    """Validated rows of one piece; `duplicates` (Survey.duplicates) fail as duplicate ids."""
    for number, raw in read_raw(piece, reading or Reading()):
        yield number, validate(number, raw, duplicates, passthrough)


def validate(
    number: int, raw: Raw, duplicates: Collection[int], passthrough: Collection[str] = ()
) -> ManifestRow | RowError:
    """`passthrough`: the spec's columns to carry, which the row's `passthrough` field holds."""
    if not isinstance(raw, RowError) and (bad := _not_text(raw)):  # any format, any field
        raw = _row_error(number, bad)
    if isinstance(raw, RowError):
        return raw
    row_id = raw.get("id")
    if isinstance(row_id, int):
        raw["id"] = row_id = str(row_id)
    named = row_id if isinstance(row_id, str) else None
    if "passthrough" in raw:
        reason = "is not a manifest column; name the columns to carry in the job spec's passthrough list"
        return RowError(number, named, "passthrough", reason)
    carried = {name: raw.pop(name) for name in passthrough if name in raw}
    try:
        row = ManifestRow.model_validate({**raw, "passthrough": carried} if carried else raw)
    except ValidationError as exc:
        field, reason = explain(exc, ManifestRow)[0]
        if reason.startswith("unknown field") and "did you mean" not in reason:  # not a typo: data to keep?
            reason += "; or list it in the job spec's passthrough to carry it into the metadata"
        if isinstance(raw.get("image_bytes"), bytes):  # a dataset's sample: say which (samples.py)
            reason += f" (in {raw['image']})"
        return RowError(number, named, field, reason)
    if number in duplicates:
        return RowError(number, row.id, "id", "duplicate id; every row needs its own id")
    return row


def read_rows(
    uri: str, passthrough: Collection[str] = (), reading: Reading | None = None
) -> Iterator[tuple[int, ManifestRow | RowError]]:
    """Every validated row of a manifest, in one process (validate, estimate, tests)."""
    found = survey(uri, reading=reading)
    duplicates = frozenset(found.duplicates.tolist())
    for piece in found.pieces:
        yield from read_piece(piece, duplicates, passthrough, reading)

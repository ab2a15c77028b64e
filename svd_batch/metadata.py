"""The metadata dataset: Parquet part files committed as the job goes, and read robustly.

Each run appends `part-<run_id>-<n>.parquet` files under the metadata prefix; a part is
written whole (atomic rename / S3 put) or not at all, so a killed driver loses only the rows
it had not yet committed. The folder reads as one dataset in pyarrow, pandas and duckdb.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from svd_batch.errors import first_line
from svd_batch.schema import COMMIT_EVERY_S, RESULT_SCHEMA, ResultRow
from svd_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

# A part is committed when either bound is reached: small enough that a crash loses little,
# large enough that a long job does not explode into tiny files.
FLUSH_ROWS = 5000


def _encode(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def rows_to_table(rows: Iterable[ResultRow | dict[str, Any]]) -> pa.Table:
    """Result rows (models, or dicts of their fields) as an Arrow table of the result schema."""
    return pa.Table.from_pylist([r if isinstance(r, dict) else r.model_dump() for r in rows], schema=RESULT_SCHEMA)


@dataclass
class MetadataWriter:
    storage: Storage
    run_id: str
    flush_rows: int = FLUSH_ROWS
    flush_seconds: float = COMMIT_EVERY_S
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0
    _parts: int = 0
    # The first rows are committed at once, so a run shows its first result without waiting
    # out a whole interval; after that, every flush_seconds.
    _last_flush: float = float("-inf")

    def add(self, rows: pa.Table | Iterable[ResultRow | dict[str, Any]]) -> None:
        if not isinstance(rows, pa.Table):
            rows = rows_to_table(rows)
        if not rows.num_rows:
            return
        self._buffer.append(rows)
        self._buffered += rows.num_rows
        if self._buffered >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self, must: bool = False) -> None:
        """Commit the buffer as one part. While storage is down the rows stay buffered for the
        next flush, so an outage costs no rows and no job; only a `must` flush raises."""
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer).cast(RESULT_SCHEMA)
        try:
            self.storage.put_bytes(_encode(table), f"part-{self.run_id}-{self._parts:05d}.parquet")
        except StorageError as exc:
            if must:
                raise StorageError(
                    f"{self._buffered} metadata rows could not be committed ({exc}); their videos are in "
                    "storage, and a rerun renders them again"
                ) from None
            log.warning("metadata commit postponed, %d rows kept for the next try: %s", self._buffered, exc)
            self._buffer, self._buffered = [table], table.num_rows
            return
        self._parts += 1
        self._buffer, self._buffered = [], 0

    @property
    def parts(self) -> int:
        return self._parts

    def close(self) -> None:
        """Commit what is buffered, then merge this run's parts into one file.

        Parts are committed every few seconds so a crash loses little; left alone, a long run
        would leave thousands of small files. Merging at the end keeps one file per run. A
        crash between writing the merged file and deleting the parts leaves rows twice, which
        "latest per key" (ledger.py) tolerates.
        """
        self.flush(must=True)
        if self._parts < 2:
            return
        keys = [f"part-{self.run_id}-{n:05d}.parquet" for n in range(self._parts)]
        with tempfile.NamedTemporaryFile(suffix=".parquet") as merged:
            # One part in memory at a time: a run can hold millions of rows.
            with pq.ParquetWriter(merged.name, RESULT_SCHEMA, compression="zstd") as out:
                for key in keys:
                    out.write_table(_conform(pq.read_table(io.BytesIO(self.storage.get_bytes(key))), RESULT_SCHEMA))
            self.storage.put_file(Path(merged.name), f"part-{self.run_id}-all.parquet")
        for key in keys:
            self.storage.delete(key)


def part_keys(storage: Storage) -> list[str]:
    return [k for k in storage.list() if k.rsplit("/", 1)[-1].startswith("part-") and k.endswith(".parquet")]


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Parts written by an older svd-batch lack newer columns: read those as nulls."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_table(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """Every part as one table of `columns`. A part that cannot be read (truncated, foreign,
    deleted between listing and reading) is named in one warning and left out: its rows are
    then simply not done, and the next run makes them again."""
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in columns]) if columns else RESULT_SCHEMA
    tables = []
    for key in part_keys(storage):
        try:
            part = pq.ParquetFile(io.BytesIO(storage.get_bytes(key)))
            if not {"key", "status"} <= set(part.schema_arrow.names):
                raise ValueError("no key and status columns: not an svd-batch metadata part")
            present = [c for c in schema.names if c in part.schema_arrow.names]
            tables.append(_conform(part.read(columns=present), schema))
        except (OSError, ValueError, StorageError, pa.ArrowException) as exc:
            log.warning("ignoring metadata part %s (%s); its rows count as not done", storage.uri(key), first_line(exc))
    return pa.concat_tables(tables) if tables else schema.empty_table()

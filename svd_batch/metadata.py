"""The metadata dataset: Parquet part files committed as the job goes, and the resume index.

Each run appends `part-<run_id>-<n>.parquet` files under the metadata prefix; a part is
written whole (atomic rename / S3 put) or not at all, so a killed driver loses only the rows
it had not yet committed. The folder reads as one dataset in pyarrow, pandas and duckdb.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from svd_batch.schema import RESULT_SCHEMA, ResultRow, Status
from svd_batch.storage import Storage

# A part is committed when either bound is reached: small enough that a crash loses little,
# large enough that a long job does not explode into tiny files.
FLUSH_ROWS = 5000
FLUSH_SECONDS = 10.0


def _encode(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass
class MetadataWriter:
    storage: Storage
    run_id: str
    flush_rows: int = FLUSH_ROWS
    flush_seconds: float = FLUSH_SECONDS
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0
    _parts: int = 0
    _last_flush: float = field(default_factory=time.monotonic)

    def add(self, rows: pa.Table | Iterable[ResultRow]) -> None:
        if not isinstance(rows, pa.Table):
            rows = pa.Table.from_pylist([r.model_dump() for r in rows], schema=RESULT_SCHEMA)
        if rows.num_rows:
            self._buffer.append(rows)
            self._buffered += rows.num_rows
        if self._buffered >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer).cast(RESULT_SCHEMA)
        self.storage.put_bytes(_encode(table), f"part-{self.run_id}-{self._parts:05d}.parquet")
        self._parts += 1
        self._buffer, self._buffered = [], 0

    @property
    def parts(self) -> int:
        return self._parts


def part_keys(storage: Storage) -> list[str]:
    return [k for k in storage.list() if k.rsplit("/", 1)[-1].startswith("part-") and k.endswith(".parquet")]


def read_table(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(storage.get_bytes(k)), columns=columns) for k in part_keys(storage)]
    if not tables:
        return RESULT_SCHEMA.empty_table().select(columns) if columns else RESULT_SCHEMA.empty_table()
    return pa.concat_tables(tables)


@dataclass(frozen=True)
class ResumeIndex:
    done: frozenset[str]  # keys with an ok video in storage
    failed: frozenset[str]  # keys whose latest result is a failure


def resume_index(storage: Storage) -> ResumeIndex:
    """Latest status per key, over every earlier run; only the columns it needs are read."""
    table = read_table(storage, ["key", "status", "ended_at"])
    done: set[str] = set()
    failed: set[str] = set()
    for key, status in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True):
        if status == Status.ok:
            done.add(key)
            failed.discard(key)
        elif status == Status.failed and key not in done:
            failed.add(key)
    return ResumeIndex(frozenset(done), frozenset(failed))

"""Parquet parts: committed as they come, merged per run at the end, read back as one dataset."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from svd_batch.metadata import MetadataWriter, read_table
from svd_batch.schema import RESULT_SCHEMA, ResultRow, Status
from svd_batch.storage import LocalStorage


def row(key: str, status: Status, run: str) -> ResultRow:
    return ResultRow(
        job="j", run_id=run, id=key, video_index=0, key=key, status=status, image="i", ended_at=dt.datetime.now(dt.UTC)
    )


def test_parts_are_committed_then_merged_into_one_file_per_run(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    writer = MetadataWriter(storage, "r1", flush_rows=2, flush_seconds=3600)
    writer.add([row("a", Status.ok, "r1"), row("b", Status.failed, "r1")])
    assert [p.name for p in tmp_path.iterdir()] == ["part-r1-00000.parquet"]  # committed before the end
    writer.add([row("c", Status.ok, "r1"), row("d", Status.ok, "r1")])
    writer.add([row("e", Status.ok, "r1")])
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-r1-all.parquet"]
    table = pd.read_parquet(tmp_path)
    assert sorted(table.key) == ["a", "b", "c", "d", "e"]
    assert read_table(storage).schema.equals(RESULT_SCHEMA)


def test_the_first_rows_are_committed_at_once_then_every_interval(tmp_path: Path) -> None:
    writer = MetadataWriter(LocalStorage(tmp_path), "r1", flush_seconds=3600)
    writer.add([row("a", Status.ok, "r1")])
    assert [p.name for p in tmp_path.iterdir()] == ["part-r1-00000.parquet"]
    writer.add([row("b", Status.ok, "r1")])
    assert len(list(tmp_path.iterdir())) == 1  # the next rows wait for the interval (or the row bound)


def test_parts_from_an_older_schema_still_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pa.table({"key": ["k"], "status": ["ok"], "run_id": ["r0"], "id": ["k"]})  # before later columns
    pq.write_table(old, tmp_path / "part-r0-00000.parquet")
    writer = MetadataWriter(LocalStorage(tmp_path), "r1")
    writer.add([row("n", Status.ok, "r1")])
    writer.close()
    table = read_table(LocalStorage(tmp_path))
    assert table.schema.equals(RESULT_SCHEMA) and sorted(table.column("key").to_pylist()) == ["k", "n"]


def test_a_corrupt_or_foreign_part_is_named_once_and_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = LocalStorage(tmp_path)
    writer = MetadataWriter(storage, "r1")
    writer.add([row("n", Status.ok, "r1")])
    writer.close()
    (tmp_path / "part-x-00000.parquet").write_text("junk\n")
    pq.write_table(pa.table({"clip": ["a.mp4"], "score": [0.5]}), tmp_path / "part-y-00000.parquet")
    with caplog.at_level("WARNING"):
        table = read_table(storage, ["key", "status"])
    assert table.column("key").to_pylist() == ["n"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("ignoring metadata part" in w and "not done" in w for w in warned)
    assert "part-x-00000.parquet" in warned[0] and "part-y-00000.parquet" in warned[1]

"""Parquet parts: committed as they come, merged per run at the end, read back as one dataset."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from svd_batch.metadata import MetadataWriter, latest, read_table, resume_index
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


def test_resume_index_and_latest_follow_the_newest_run(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for run, rows in (
        ("20260101T000000Z-a", [row("x", Status.failed, "1"), row("y", Status.ok, "1")]),
        ("20260102T000000Z-b", [row("x", Status.ok, "2"), row("z", Status.failed, "2")]),
    ):
        writer = MetadataWriter(storage, run)
        writer.add(rows)
        writer.close()
    index = resume_index(storage)
    assert index.done == {"x", "y"} and index.failed == {"z"}
    current = latest(read_table(storage)).to_pandas().set_index("key")
    assert current.loc["x", "status"] == "ok" and len(current) == 3


def test_a_retryable_failure_is_queued_again_and_a_final_one_waits_for_retry_failed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    died = row("died", Status.failed, "1").model_copy(update={"retryable": True})
    for run, rows in (
        ("20260101T000000Z-a", [died, row("bad", Status.failed, "1"), row("later", Status.failed, "1")]),
        ("20260102T000000Z-b", [row("later", Status.failed, "2").model_copy(update={"retryable": True})]),
    ):
        writer = MetadataWriter(storage, run)
        writer.add(rows)
        writer.close()
    index = resume_index(storage)
    assert index.failed == {"bad"} and not index.done  # died and later (retryable at last) render again


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
    assert resume_index(LocalStorage(tmp_path)).done == {"k", "n"}

"""The ledger's one definition of "latest" and "done", its failure classes, run records and lease."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from svd_batch import ledger
from svd_batch.hashes import string_hashes as hashes_of
from svd_batch.ledger import KeySet, Lease, LeaseHeld, latest, progress, repair, run_history
from svd_batch.metadata import MetadataWriter, read_table, rows_to_table
from svd_batch.schema import ResultRow, Status
from svd_batch.storage import LocalStorage


def row(key: str, status: Status, **fields: object) -> ResultRow:
    fields = {"run_id": "r", "ended_at": dt.datetime.now(dt.UTC)} | fields
    return ResultRow(job="j", id=key, video_index=0, key=key, status=status, image="i", **fields)  # type: ignore[arg-type]


def commit(storage: LocalStorage, run: str, rows: list[ResultRow]) -> None:
    writer = MetadataWriter(storage, run)
    writer.add([r.model_copy(update={"run_id": run}) for r in rows])
    writer.close()


def members(keys: KeySet, *candidates: str) -> set[str]:
    """Which of the candidates the set holds, checking that it holds no other key."""
    found = {k for k in candidates if k in keys}
    assert len(found) == len(keys)
    return found


def test_a_key_set_holds_exactly_its_keys_in_eight_bytes_each() -> None:
    keys = [f"videos/row-{i}-{i * 7919:016x}-v0" for i in range(200_000)]
    held = KeySet(keys[::2])
    assert len(held) == 100_000 and held.hashes.nbytes == 800_000
    assert all(k in held for k in keys[::2]) and not any(k in held for k in keys[1::2])
    assert "" not in KeySet([]) and None not in held


@pytest.mark.parametrize("hashes", ["real", "colliding"])
def test_latest_equals_a_plain_python_reading_of_its_definition(hashes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if hashes == "colliding":  # ten million keys collide in 64 bits about once in 370,000 ledgers: made common
        monkeypatch.setattr(ledger, "string_hashes", lambda keys: hashes_of(keys) % np.uint64(5))
    rng = random.Random(3)
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [
        row(
            f"k{rng.randrange(40)}",
            rng.choice([Status.ok, Status.failed]),
            run_id=f"2026010{rng.randrange(1, 5)}T000000Z-r",
            ended_at=rng.choice([None, base + dt.timedelta(seconds=rng.randrange(5))]),
            error=str(n),  # which row this is
        )
        for n in range(1500)
    ]
    table = rows_to_table(rows)
    table = table.set_column(
        table.schema.get_field_index("status"),
        "status",
        pa.array([rng.choice(["ok", "failed", "skipped"]) for _ in rows]),
    )
    statuses = table.column("status").to_pylist()
    newest: dict[str, tuple[tuple[str, int, dt.datetime], str]] = {}
    for r, status in zip(rows, statuses, strict=True):  # in order: of equal rows the last read wins
        if status == "skipped":
            continue
        when = (r.run_id, r.ended_at is not None, r.ended_at or base)
        if r.key not in newest or when >= newest[r.key][0]:
            newest[r.key] = (when, r.error)
    got = latest(table)
    assert dict(zip(got.column("key").to_pylist(), got.column("error").to_pylist(), strict=True)) == {
        k: e for k, (_, e) in newest.items()
    }
    read = [int(e) for e in got.column("error").to_pylist()]
    assert read == sorted(read)  # in the order they were read


def test_latest_is_the_newest_produced_row_and_older_skipped_rows_do_not_count(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    commit(storage, "20260101T000000Z-a", [row("x", Status.failed), row("y", Status.ok, mp4_uri="file:///y.mp4")])
    commit(storage, "20260102T000000Z-b", [row("x", Status.ok, mp4_uri="file:///x.mp4")])
    # What a version before the ledger wrote on every rerun: a per-row "skipped" without URIs.
    skipped = row("y", Status.ok).model_copy(update={"status": "skipped"})
    commit(storage, "20260103T000000Z-c", [skipped])
    current = latest(read_table(storage)).to_pandas().set_index("key")
    assert current.status.to_dict() == {"x": "ok", "y": "ok"}
    assert current.loc["y", "mp4_uri"] == "file:///y.mp4"
    assert members(progress(storage, ["mp4"]).done, "x", "y") == {"x", "y"}


def test_done_means_every_format_and_a_partial_key_keeps_what_it_has(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    commit(storage, "20260101T000000Z-a", [row("k", Status.ok, mp4_uri="file:///k.mp4")])
    earlier = progress(storage, ["mp4", "gif"])
    assert not len(earlier.done) and earlier.kept == {"k": {"mp4_uri": "file:///k.mp4"}}
    assert members(progress(storage, ["mp4"]).done, "k") == {"k"}


def test_retryable_failures_come_back_and_final_ones_wait(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    commit(
        storage,
        "20260101T000000Z-a",
        [
            row("died", Status.failed, retryable=True),
            row("bad", Status.failed, retryable=False),
            row("old", Status.failed),
        ],
    )
    commit(storage, "20260102T000000Z-b", [row("fixed", Status.failed, retryable=False)])
    commit(storage, "20260103T000000Z-c", [row("fixed", Status.ok, mp4_uri="file:///f.mp4")])
    earlier = progress(storage, ["mp4"])
    # "old": a failure from before failure classes, read as final.
    assert members(earlier.final, "died", "bad", "old", "fixed") == {"bad", "old"}
    assert members(earlier.done, "died", "bad", "old", "fixed") == {"fixed"}


def test_verify_outputs_treats_a_done_key_whose_object_is_gone_as_not_done(tmp_path: Path) -> None:
    meta, out = LocalStorage(tmp_path / "meta"), LocalStorage(tmp_path / "out")
    uris = {k: out.put_bytes(b"video", f"videos/{k}.mp4") for k in ("a", "b")}
    frames = out.put_bytes(b"png", "videos/c.frames/00000.png").rsplit("/", 1)[0] + "/"
    commit(
        meta,
        "20260101T000000Z-a",
        [row(k, Status.ok, mp4_uri=u) for k, u in uris.items()] + [row("c", Status.ok, png_uri=frames)],
    )
    out.delete("videos/b.mp4")
    assert members(progress(meta, ["mp4"]).done, "a", "b", "c") == {"a", "b"}
    assert members(progress(meta, ["mp4"], outputs=out).done, "a", "b", "c") == {"a"}
    assert members(progress(meta, ["png"], outputs=out).done, "a", "b", "c") == {"c"}


def test_repair_drops_the_parts_a_killed_compaction_left_beside_its_merged_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    writer = MetadataWriter(storage, "20260101T000000Z-a", flush_rows=1)
    writer.add([row("a", Status.ok)])
    writer.add([row("b", Status.ok)])
    parts = sorted(p.name for p in tmp_path.iterdir())
    writer.close()
    for name in parts:  # as if killed after the merged file was written, before the deletes
        (tmp_path / name).write_bytes((tmp_path / "part-20260101T000000Z-a-all.parquet").read_bytes())
    repair(storage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-20260101T000000Z-a-all.parquet"]


def test_one_lease_at_a_time_taken_over_only_when_its_heartbeat_is_stale(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = Lease(storage, "run-1", ttl_s=60)
    assert first.acquire() is None
    with pytest.raises(LeaseHeld, match=r"run run-1 \(pid \d+ on .*\) holds its lease since .* heartbeat 0 s ago"):
        Lease(storage, "run-2", ttl_s=60).acquire()
    first._stop.set()  # its heartbeat stops, as if the driver were killed
    lease_file = next((tmp_path / "_lease").iterdir())
    record = json.loads(lease_file.read_text())
    record["heartbeat_at"] = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=300)).isoformat()
    lease_file.write_text(json.dumps(record))
    third = Lease(storage, "run-3", ttl_s=60)
    note = third.acquire()
    assert note is not None and note.startswith("taking over the lease of run run-1") and "300 s old" in note
    third.release()
    fourth = Lease(storage, "run-4", ttl_s=60)
    assert fourth.acquire() is None  # a released lease is free
    fourth.release()
    assert [p.name for p in (tmp_path / "_lease").iterdir()] == ["00000002.json"]  # older generations pruned


def test_the_run_history_reads_every_record_and_names_a_broken_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from svd_batch.ledger import write_record
    from svd_batch.schema import RunRecord

    storage = LocalStorage(tmp_path)
    now = dt.datetime.now(dt.UTC)
    for run in ("20260102T000000Z-b", "20260101T000000Z-a"):
        record = RunRecord(
            job="j",
            run_id=run,
            state="finished",
            exit_code=0,
            spec_sha256="s",
            model_fingerprint="m",
            versions={},
            host="h",
            pid=1,
            counts={"ok": 1},
            started_at=now,
        )
        write_record(storage, record)
    (tmp_path / "broken.json").write_text("{")
    with caplog.at_level("WARNING"):
        history = run_history(storage)
    assert [r.run_id for r in history] == ["20260101T000000Z-a", "20260102T000000Z-b"]
    assert len(caplog.records) == 1 and "broken.json" in caplog.records[0].getMessage()


def test_a_lease_whose_holder_died_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    import subprocess

    storage = LocalStorage(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    held = Lease(storage, "killed-run", ttl_s=600)
    held.acquire()
    held._stop.set()
    lease_file = next((tmp_path / "_lease").iterdir())
    record = json.loads(lease_file.read_text())
    lease_file.write_text(json.dumps({**record, "pid": dead.pid}))  # its driver was kill -9'd
    note = Lease(storage, "rerun", ttl_s=600).acquire()
    assert note is not None and "killed-run" in note and note.endswith("that process is gone from this host")

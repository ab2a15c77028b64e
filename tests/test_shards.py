"""WebDataset shards: read back by `webdataset` and Ray Data, committed whole, never a sample twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from svd_batch.driver import Job, load_spec
from svd_batch.engine.simulated import FINGERPRINT
from svd_batch.metadata import MetadataWriter, rows_to_table
from svd_batch.plan import Planner
from svd_batch.schema import ManifestRow, ResultRow, WorkItem
from svd_batch.shards import OpenShard, member_name, reconcile
from svd_batch.storage import open_storage
from svd_batch.worker import RowWorker
from tests.helpers import SIMULATE, results, rows_and_images, run_job, wait_until, worker_pids, write_job

MEMBERS = ["input.jpg", "json", "mp4", "poster.jpg"]
NEVER = 1e9  # a motion no clip has


def names(tar: Path) -> list[str]:
    with tarfile.open(tar) as opened:
        return opened.getnames()


def tars(spec: Path) -> dict[str, list[str]]:
    """Each committed shard's member file names, by URI."""
    return {p.as_uri(): names(p) for p in sorted((Path(load_spec(spec).output) / "shards").glob("*.tar"))}


def samples(names: list[str]) -> Counter[str]:
    return Counter(name.split(".", 1)[0] for name in names)


def row(key: str, **fields: object) -> ResultRow:
    return ResultRow(job="t", run_id="r1", id=key, video_index=0, key=f"videos/{key}", status="ok", image="x", **fields)


def test_member_names_have_no_dot_so_readers_group_a_samples_files() -> None:
    assert member_name("videos/cat.v2_01-ab12cd34ef56ab78-v0") == "cat_v2_01-ab12cd34ef56ab78-v0"


def test_a_shard_is_in_storage_only_once_committed_and_its_rows_name_it_then(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    shard = OpenShard(storage, "run1", size=2)
    first, second = row("a.1"), row("b")
    shard.add(first, {"mp4": b"m", "json": b"{}"})
    assert not shard.full and not (tmp_path / "out" / "shards").exists() and first.shard_uri is None
    shard.add(second, {"mp4": b"n", "json": b"{}"})
    assert shard.full
    assert shard.commit() == [first, second]
    (tar,) = (tmp_path / "out" / "shards").glob("*.tar")
    assert first.shard_uri == second.shard_uri == tar.as_uri() and first.shard_member == "a_1"
    assert names(tar) == ["a_1.mp4", "a_1.json", "b.mp4", "b.json"]
    assert shard.rows == [] and shard.commit() == []  # the next shard is empty: nothing to commit
    shard.add(row("c"), {"mp4": b"o"})
    assert shard.commit()[0].shard_uri != tar.as_uri()  # a new name: a committed shard is never written over


def test_the_local_folder_of_a_killed_worker_goes_with_the_next_shard_and_an_ending_workers_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f"svd-batch-shard-{dead.pid}-abc"
    killed.mkdir()
    (killed / "run0-1234abcd-00000.tar").write_bytes(b"half a shard")
    running = tmp_path / f"svd-batch-shard-{os.getpid()}-def"
    running.mkdir()
    shard = OpenShard(open_storage(str(tmp_path / "out")), "run1", size=2)
    assert not killed.exists() and running.is_dir() and shard.local.parent == tmp_path
    shard.add(row("a"), {"mp4": b"m"})
    shard.commit()
    shard.remove()
    assert not shard.local.exists() and running.is_dir()


def test_reconcile_deletes_shards_no_row_names_and_indexes_the_rest(tmp_path: Path) -> None:
    output, meta = open_storage(str(tmp_path / "out")), open_storage(str(tmp_path / "out" / "metadata"))
    named, orphan = OpenShard(output, "run1", 9), OpenShard(output, "run2", 9)
    rows = [row("a"), row("b")]
    for r in rows:
        named.add(r, {"mp4": b"m"})
    named.commit()
    orphan.add(row("c"), {"mp4": b"m"})  # committed, but its run died before its row was
    orphan.commit()
    writer = MetadataWriter(meta, "run1")
    writer.add(rows_to_table(rows))
    writer.close()
    assert reconcile(output, meta) == 1
    assert [p.as_uri() for p in (tmp_path / "out" / "shards").glob("*.tar")] == [rows[0].shard_uri]
    index = pq.read_table(tmp_path / "out" / "shards" / "index.parquet").to_pylist()
    assert [(i["shard"], i["member"], i["key"]) for i in index] == [(r.shard_uri, r.shard_member, r.key) for r in rows]


def _worker_and_two_rows(tmp_path: Path, tiny_model: Path) -> tuple[RowWorker, list[WorkItem]]:
    """A simulated worker whose shards hold two samples, and two rows' work items."""
    spec = load_spec(write_job(tmp_path, rows_and_images(tmp_path, 2), tiny_model, shards={"size": 2}, simulate=0.01))
    planner = Planner(spec, spec.manifest, "r1", FINGERPRINT)
    items = [planner.resolve(ManifestRow(id=f"q{i}", image=f"img/{i}.png"), i + 1)[0].work_item() for i in (0, 1)]
    return RowWorker(spec), items


def test_a_shard_committed_in_one_call_hands_the_other_calls_row_over_once(tmp_path: Path, tiny_model: Path) -> None:
    """Two calls in a worker's threads: the first's row waits in the open shard, the second's
    fills and commits it, and the second settles first. Found by the chaos run (seed 2): the
    first call then handed its row back again, so the ledger held it twice, in two parts."""
    worker, (first, second) = _worker_and_two_rows(tmp_path, tiny_model)
    mine = worker.process([first])  # in the open shard: held
    theirs = worker.process([second])  # fills the shard, which is committed
    now, committed = worker.settle(theirs)
    assert now == [] and sorted(r.id for r in committed) == ["q0", "q1"]
    assert worker.settle(mine) == ([], [])  # q0 went with its shard, and only with it
    assert len({r.shard_uri for r in committed}) == 1 and all(r.status == "ok" for r in committed)


def test_every_row_is_complete_when_its_shard_is_committed_for_another_call_may_hand_it_over(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos run (seed 1): the call that filled a shard committed it before its own
    row was complete, and another call handed that row over at once: 'failed', no error, no
    end time, in the ledger."""
    worker, items = _worker_and_two_rows(tmp_path, tiny_model)
    seen: list[tuple[str, str, object]] = []
    commit = OpenShard.commit

    def watched(shard: OpenShard) -> list[ResultRow]:
        seen.extend((r.id, r.status, r.ended_at) for r in shard.rows)  # what a settle could take now
        return commit(shard)

    monkeypatch.setattr(OpenShard, "commit", watched)
    for item in items:
        worker.process([item])
    assert [(i, status) for i, status, _ in seen] == [("q0", "ok"), ("q1", "ok")] and all(e for _, _, e in seen)


def test_a_gated_job_writes_only_its_ok_clips_as_shards_that_webdataset_and_ray_data_read(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """On simulated devices: gates, retries and shards are the worker's logic on real frames of
    the right size; the S3 job of test_job.py writes shards from the real model."""
    import ray
    import webdataset as wds

    rows = rows_and_images(tmp_path, 6)
    for r in rows[:2]:  # these two miss their gate on every seed: rejected, not in a shard
        r["quality"] = {"min_motion": NEVER}
    rows[2]["caption"] = "a caption"
    spec = write_job(
        tmp_path, rows, tiny_model, formats=[], shards={"size": 2}, quality={"max_tries": 2},
        workers={"count": 2, "batch_size": 1}, simulate=SIMULATE,
    )  # fmt: skip
    assert run_job(spec) == Counter(ok=4, rejected=2)
    df = results(spec)
    assert (df.tries <= 2).all() and df[df.status == "rejected"].shard_uri.isna().all()
    ok = df[df.status == "ok"].set_index("shard_member")
    shards = tars(spec)
    assert all(len(samples(names)) <= 2 and set(samples(names).values()) == {4} for names in shards.values())
    members = [m for names in shards.values() for m in samples(names)]
    assert sorted(members) == sorted(ok.index)  # every ok clip once, in the shard its row names
    assert all(name in samples(shards[ok.shard_uri[name]]) for name in ok.index)
    assert not (Path(load_spec(spec).output) / "videos").exists()  # shards instead of loose files

    read = list(wds.WebDataset(list(shards), shardshuffle=False))
    assert sorted(s["__key__"] for s in read) == sorted(ok.index)
    assert all(sorted(k for k in s if not k.startswith("__")) == MEMBERS for s in read)
    for sample in read:
        meta = json.loads(sample["json"])
        expected = ok.loc[sample["__key__"]]
        assert meta["seed"] == expected.seed and meta["scores"]["motion"] == pytest.approx(expected.score_motion)
        assert meta["caption"] == expected.caption and meta["params"]["num_frames"] == 4
        assert sample["mp4"][4:8] == b"ftyp" and sample["poster.jpg"][:2] == b"\xff\xd8"
    assert ray.data.read_webdataset(list(shards)).count() == len(ok)
    index = pd.read_parquet(Path(load_spec(spec).output) / "shards" / "index.parquet")
    assert sorted(zip(index["shard"], index["member"], strict=True)) == sorted(zip(ok.shard_uri, ok.index, strict=True))

    assert run_job(spec) == Counter(skipped=6)  # ok in a shard, or rejected: done
    assert tars(spec) == shards


@pytest.mark.slow
def test_a_worker_killed_with_an_open_shard_loses_only_its_rows_and_no_sample_is_in_two_shards(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` writes shards in
    test_a_gated_job_writes_only_its_ok_clips_as_shards_that_webdataset_and_ray_data_read and to S3
    in test_job.py::test_s3_manifest_images_output_and_shards, and checks a dead worker's shard
    folder goes in
    test_the_local_folder_of_a_killed_worker_goes_with_the_next_shard_and_an_ending_workers_with_it."""
    rows = rows_and_images(tmp_path, 7)
    spec = write_job(tmp_path, rows, tiny_model, formats=[], shards={"size": 3}, workers={"count": 1, "batch_size": 1})
    job = Job(load_spec(spec))
    outcome: list[Counter[str]] = []
    thread = threading.Thread(target=lambda: outcome.append(job.run()))
    thread.start()

    def open_shard() -> Path | None:
        """The worker's open shard, once it holds two samples: the first from a call that returned."""
        for path in Path(tempfile.gettempdir()).glob(f"svd-batch-shard-*/{job.run_id}-*.tar"):
            try:
                if len(samples(names(path))) >= 2:
                    return path
            except (OSError, tarfile.TarError):  # caught mid-write
                continue
        return None

    killed = wait_until(open_shard, "an open shard with two samples", timeout=600)
    (pid,) = wait_until(worker_pids, "the worker process")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    (counts,) = outcome
    df = results(spec)
    lost = df[df.status == "failed"]
    assert counts["ok"] + counts["failed"] == 7 and len(lost) == counts["failed"] >= 1
    assert lost.retryable.all() and lost.error.str.contains("open shards of workers that died").all()
    shards = tars(spec)
    assert killed.name not in {Path(uri).name for uri in shards}  # the dead worker's open shard: never committed
    members = [m for names in shards.values() for m in samples(names)]
    assert sorted(members) == sorted(df[df.status == "ok"].shard_member)  # no half shard, no sample twice

    assert run_job(spec) == Counter(ok=counts["failed"], skipped=counts["ok"])  # the lost rows, rendered again
    members = [m for names in tars(spec).values() for m in samples(names)]
    assert len(members) == len(set(members)) == 7
    assert not killed.parent.exists()  # the dead worker's local tar: removed by the next worker's first shard

"""The ledger on a real cluster: reruns, stalls, spec changes, bad manifests, concurrent starts."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svd_batch.driver import Job, JobError, load_spec
from svd_batch.report import build
from tests.helpers import (
    SIMULATE,
    cli,
    latest_results,
    results,
    rows_and_images,
    run_job,
    run_records,
    status_counts,
    wait_until,
    write_job,
)


def test_a_report_after_reruns_shows_every_video_and_the_run_history(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    spec = write_job(tmp_path, rows_and_images(tmp_path, 3), tiny_model, simulate=SIMULATE)
    assert run_job(spec) == Counter(ok=3)
    assert run_job(spec) == Counter(skipped=3)
    gone = Path(latest_results(spec).mp4_uri.iloc[0].removeprefix("file://"))
    gone.unlink()  # a video deleted from storage: done in the ledger, but not made any more
    assert run_job(spec) == Counter(skipped=3)
    assert run_job(spec, verify_outputs=True) == Counter(ok=1, skipped=2)
    assert gone.is_file()
    assert len(results(spec)) == 4  # reruns write no rows: the metadata holds what runs made
    records = run_records(spec)
    assert [r.counts for r in records] == [{"ok": 3}, {"skipped": 3}, {"skipped": 3}, {"ok": 1, "skipped": 2}]
    assert all(r.state == "finished" and r.exit_code == 0 and r.ended_at for r in records)
    assert len({r.model_fingerprint for r in records}) == 1 and records[0].versions["ray"]
    page = build(load_spec(spec).metadata_uri)
    _, sheet = page.split("<h2>Contact sheet (3 of 3)</h2>")  # after the best and worst clips by motion
    # One poster per video (its latest row), each beside its input.
    assert sheet.count("<img class='video' src='data:image/jpeg") == sheet.count("<img class='input' src=") == 3
    assert all(r.run_id in page for r in records)  # the run history, one line per run


def test_a_stalled_run_is_made_by_the_next_plain_run(tmp_path: Path, tiny_model: Path, ray_cluster: object) -> None:
    rows = rows_and_images(tmp_path, 2)
    workers = {"count": 1, "resources": {"nope": 1}, "no_progress_timeout_s": 5}
    spec = write_job(tmp_path, rows, tiny_model, workers=workers, simulate=SIMULATE)
    job = Job(load_spec(spec))
    assert job.run() == Counter(failed=2)
    assert job.failures == Counter({("worker", "Stalled", True): 2})  # what the run's summary lists
    failed = latest_results(spec)
    assert (failed.error_stage == "worker").all() and (failed.error_type == "Stalled").all()
    assert failed.retryable.all() and failed.error.str.contains("no worker made progress for 5 s").all()
    spec = write_job(tmp_path, rows, tiny_model, simulate=SIMULATE)  # the cluster is "fixed": no impossible resource
    assert run_job(spec) == Counter(ok=2)  # no --retry-failed: a stall is no fault of the rows
    assert (latest_results(spec).status == "ok").all()


BAD_LINES = [
    b'{"id":"caf\xe9","image":"img/0.png"}',  # not UTF-8
    b"[" * 40000,  # nested past Python's recursion limit
    b'{"id":"\\ud800","image":"img/0.png"}',  # a lone surrogate
    b'{"id":"lat","image":"img/0.png","latents":"\\udfff.npy"}',
    b'{"id":"big-seed","image":"img/0.png","seed":9223372036854775807,"num_videos_per_prompt":2}',
]


def test_hostile_manifest_lines_fail_their_own_rows_and_the_rest_render(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    rows = rows_and_images(tmp_path, 2)
    spec = write_job(tmp_path, rows, tiny_model, simulate=SIMULATE)
    manifest = tmp_path / "manifest.jsonl"
    good = [json.dumps(r).encode() for r in rows]
    manifest.write_bytes(b"\n".join([good[0], *BAD_LINES, good[1]]) + b"\n")
    checked = cli("validate", str(spec))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr + checked.stdout
    lines = [line for line in checked.stdout.splitlines() if line.startswith("row ")]
    assert [line.split()[1] for line in lines] == ["2", "3", "4", "5", "6"]
    assert "byte 0xE9 at column 11 is not UTF-8" in lines[0] and "nested too deeply" in lines[1]
    assert "id: lone surrogate U+D800" in lines[2] and "latents: lone surrogate U+DFFF" in lines[3]
    assert "seed: seed 9223372036854775807 + num_videos_per_prompt 2" in lines[4]
    job = Job(load_spec(spec))
    assert job.run() == Counter(ok=2, failed=5)
    assert job.failures == Counter({("manifest", "InvalidRow", False): 5})
    failed = latest_results(spec).query("status == 'failed'")
    assert set(failed.error_stage) == {"manifest"} and not failed.retryable.any()
    assert run_job(spec) == Counter(skipped=2, failed=5)  # a rerun reads the same manifest, and goes on


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_hostile_csv_and_parquet_rows_fail_their_own_rows(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    rows = rows_and_images(tmp_path, 1)
    if kind == "csv":
        manifest = tmp_path / "m.csv"
        manifest.write_bytes(b'id,image\ncaf\xe9,img/0.png\nd,"' + b"[" * 40000 + b'"\nq0,img/0.png\n')
    else:
        manifest = tmp_path / "m.parquet"
        # A string column whose first value is not UTF-8 (Parquet does not check on write).
        ids = pa.Array.from_buffers(
            pa.string(), 2, [None, pa.py_buffer(np.array([0, 4, 6], np.int32)), pa.py_buffer(b"caf\xe9q0")]
        )
        pq.write_table(pa.table({"id": ids, "image": ["img/0.png", rows[0]["image"]]}), manifest)
    spec = write_job(tmp_path, rows, tiny_model, manifest=manifest.name)
    checked = cli("validate", str(spec))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr + checked.stdout
    lines = [line for line in checked.stdout.splitlines() if line.startswith("row ")]
    assert len(lines) == (2 if kind == "csv" else 1) and "is not UTF-8" in lines[0]
    assert f"{len(lines)} bad row(s)" in checked.stderr


def test_a_corrupt_part_is_named_once_and_its_rows_are_made_again(
    tmp_path: Path, tiny_model: Path, ray_cluster: object, caplog: pytest.LogCaptureFixture
) -> None:
    spec = write_job(tmp_path, rows_and_images(tmp_path, 2), tiny_model, simulate=SIMULATE)
    assert run_job(spec) == Counter(ok=2)
    meta = Path(load_spec(spec).metadata_uri)
    (meta / "part-x-00000.parquet").write_text("junk\n")
    (part,) = meta.glob("part-2*.parquet")
    part.write_bytes(part.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        assert run_job(spec) == Counter(ok=2)  # its rows are simply not done
    warned = [r.getMessage() for r in caplog.records if "ignoring metadata part" in r.getMessage()]
    assert len(warned) == 2 and any("part-x-00000.parquet" in w for w in warned)


@pytest.mark.slow
def test_adding_a_format_writes_only_what_is_missing_and_new_weights_make_new_videos(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` covers a key following what makes its video in
    test_job.py::test_changing_a_parameter_rerenders_only_that_row; this one adds a format and
    changes the weights."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    rows = rows_and_images(tmp_path, 2)
    spec = write_job(tmp_path, rows, model)
    assert run_job(spec) == Counter(ok=2)
    first = latest_results(spec).set_index("id")
    mp4s = {i: Path(load_spec(spec).output, "videos", Path(u).name) for i, u in first.mp4_uri.items()}
    stamps = {i: p.stat().st_mtime_ns for i, p in mp4s.items()}

    spec = write_job(tmp_path, rows, model, formats=["mp4", "gif"])
    assert run_job(spec) == Counter(ok=2)
    both = latest_results(spec).set_index("id")
    assert (both.mp4_uri == first.mp4_uri).all() and both.gif_uri.notna().all()
    assert {i: p.stat().st_mtime_ns for i, p in mp4s.items()} == stamps  # the mp4s were kept, not rewritten
    assert run_job(spec) == Counter(skipped=2)

    weights = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(0.01)
    save_file(tensors, weights, metadata={"format": "pt"})  # new weights, same path and shapes
    job = Job(load_spec(spec))
    assert job.run() == Counter(ok=2)
    made = latest_results(spec).query(f"run_id == '{job.run_id}'")
    assert len(made) == 2 and set(made.key).isdisjoint(first.key)


@pytest.mark.slow
def test_two_runs_at_once_render_nothing_twice_and_the_second_names_the_first(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` refuses a second run while the first holds the lease in
    test_operate.py::test_drain_finishes_in_flight_rows_and_the_rerun_resumes, and the lease's logic
    in test_ledger.py."""
    spec = write_job(tmp_path, rows_and_images(tmp_path, 4), tiny_model, workers={"count": 1, "batch_size": 1})
    first = Job(load_spec(spec))
    done: list[Counter[str]] = []
    thread = threading.Thread(target=lambda: done.append(first.run()))
    thread.start()
    wait_until(lambda: status_counts(spec).get("ok"), "the first run's first video")
    second = cli("run", str(spec))
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip().replace("\n", " ")
    assert "holds its lease since" in line and first.run_id in line and "heartbeat" in line
    with pytest.raises(JobError, match=first.run_id):
        Job(load_spec(spec)).run()
    thread.join(timeout=600)
    assert done == [Counter(ok=4)]
    made = results(spec)
    assert len(made) == 4 and made.key.is_unique  # one ok row per key, nothing made twice
    assert run_job(spec) == Counter(skipped=4)  # released at its end: the next run goes

"""Jobs on a real local Ray cluster: manifests in, videos to storage, Parquet out, resumable."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections import Counter
from pathlib import Path

import boto3
import duckdb
import numpy as np
import pandas as pd
import pytest

from chaos.proxy import free_port
from svd_batch import cluster
from svd_batch.cluster import ClusterError
from svd_batch.control import History, JobControl
from svd_batch.driver import Job, load_spec
from tests.helpers import (
    FAST,
    SIMULATE,
    cli,
    make_image,
    results,
    rows_and_images,
    run_control,
    run_job,
    run_records,
    videos_match_metadata,
    wait_until,
    worker_pids,
    write_job,
)


def _local_rows(folder: Path) -> list[dict]:
    for i in range(3):
        make_image(folder / "img" / f"{i}.png", seed=i)
    (folder / "img" / "text.png").write_text("not an image")
    return [
        {"id": "a", "image": "img/0.png", "tags": {"k": "v"}, "caption": "a red fox", "src": {"url": "x", "n": 1}},
        {"id": "b", "image": "img/1.png", "motion_bucket_id": 40},
        {"id": "c", "image": "img/2.png", "seed": 99, "num_videos_per_prompt": 2},
        {"id": "bad-image", "image": "img/text.png"},
        {"id": "bad-field", "image": "img/0.png", "motion_bucket": 3},
    ]


@pytest.fixture(scope="module")
def local_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_cluster: object) -> Path:
    folder = tmp_path_factory.mktemp("job")
    spec = write_job(folder, _local_rows(folder), tiny_model, passthrough=["src"])
    assert run_job(spec) == Counter(ok=4, failed=2)
    return spec


@pytest.fixture(scope="module")
def rerun_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_cluster: object) -> Path:
    """local_job's rows on simulated devices: what a rerun skips, retries or renders again is
    the ledger's logic, and each rerun of a real job would load the model again only to decide it."""
    folder = tmp_path_factory.mktemp("rerun")
    spec = write_job(folder, _local_rows(folder), tiny_model, passthrough=["src"], simulate=SIMULATE)
    assert run_job(spec) == Counter(ok=4, failed=2)
    return spec


def test_every_row_ends_as_one_metadata_row_per_video(local_job: Path) -> None:
    df = results(local_job)
    assert sorted(zip(df.id, df.video_index, df.status, strict=True)) == [
        ("a", 0, "ok"),
        ("b", 0, "ok"),
        ("bad-field", 0, "failed"),
        ("bad-image", 0, "failed"),
        ("c", 0, "ok"),
        ("c", 1, "ok"),
    ]
    ok = df[df.status == "ok"]
    umask = os.umask(0)
    os.umask(umask)
    for uri in ok.mp4_uri:
        video = Path(uri.removeprefix("file://")).stat()
        assert video.st_size > 0 and stat.S_IMODE(video.st_mode) == 0o666 & ~umask  # 0644 under umask 022
    assert ok.mp4_uri.is_unique
    c = ok[ok.id == "c"].sort_values("video_index")
    assert c.seed.tolist() == [99, 100]  # video v of a row uses seed + v
    a = ok[ok.id == "a"].iloc[0]
    assert a.params["motion_bucket_id"] == 127 and a.params["height"] == 32
    assert json.loads(a.tags) == {"k": "v"}
    assert a.caption == "a red fox" and json.loads(a.passthrough) == {"src": {"url": "x", "n": 1}}  # as given
    assert df[df.id != "a"].caption.isna().all() and df[df.id != "a"].passthrough.isna().all()
    assert len(a.model_sha256) == 64 and len(a.input_sha256) == 64 and a.input_width == 48
    assert a.denoise_s > 0 and a.encode_s > 0 and a.device == "cpu" and a.attempt == 1
    # One worker: its first row carries the load and the memory it peaked at (a MindSpore process).
    assert df.load_s.notna().sum() == 1 and df.load_peak_rss_mb.notna().sum() == 1
    assert 200 < df.load_peak_rss_mb.max() < 8000


def test_every_video_is_scored_in_its_worker_and_no_failed_row_is(local_job: Path) -> None:
    df = results(local_job)
    ok, failed = df[df.status == "ok"], df[df.status == "failed"]
    scores = ["score_motion", "score_flicker", "score_sharpness", "score_fidelity", "score_consistency", "score_s"]
    assert np.isfinite(ok[scores].to_numpy(dtype=float)).all()
    assert (ok[scores].drop(columns="score_consistency") >= 0).all().all()
    assert ok.score_consistency.between(-1, 1).all() and (ok.score_fidelity <= 100).all()
    assert failed[scores].isna().all().all()
    # Different seeds of one image make different clips, and their scores say so.
    c = ok[ok.id == "c"]
    assert c.score_sharpness.nunique() == 2


def test_failures_name_row_field_and_fix(local_job: Path) -> None:
    df = results(local_job).set_index("id")
    assert "did you mean 'motion_bucket_id'" in df.loc["bad-field", "error"]
    assert "row 5" in df.loc["bad-field", "error"]
    assert "bad-image" in df.loc["bad-image", "error"] and "image:" in df.loc["bad-image", "error"]
    # Classes are columns: both are the row's own fault, rendered again only with --retry-failed.
    classes = df[["error_stage", "error_type", "retryable"]].dropna().T.to_dict("list")
    assert classes == {"bad-field": ["manifest", "InvalidRow", False], "bad-image": ["image", "ImageError", False]}


def test_metadata_reads_as_one_dataset_everywhere(local_job: Path) -> None:
    folder = load_spec(local_job).metadata_uri
    assert [p.name for p in Path(folder).glob("*.parquet")] == [p.name for p in Path(folder).glob("part-*-*.parquet")]
    assert len(pd.read_parquet(folder)) == 6
    count = duckdb.sql(f"select count(*) from read_parquet('{folder}/*.parquet')").fetchall()[0]
    assert count == (6,)


def test_rerun_renders_nothing_done_and_retry_failed_retries(rerun_job: Path) -> None:
    # the invalid manifest row is reported on every run until the manifest is fixed
    assert run_job(rerun_job) == Counter(skipped=5, failed=1)
    assert run_job(rerun_job, retry_failed=True) == Counter(skipped=4, failed=2)


def test_changing_a_parameter_rerenders_only_that_row(rerun_job: Path) -> None:
    manifest = rerun_job.parent / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["motion_bucket_id"] = 41
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_job(rerun_job) == Counter(ok=1, skipped=4, failed=1)
    latest = results(rerun_job).sort_values("run_id").groupby(["id", "video_index"]).last()
    assert latest.loc[("b", 0), "params"]["motion_bucket_id"] == 41


def test_s3_manifest_images_output_and_shards(
    tmp_path: Path, tiny_model: Path, s3_server: str, ray_cluster: object
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="inputs")
    s3.create_bucket(Bucket="outputs")
    for i in range(2):
        s3.put_object(
            Bucket="inputs", Key=f"m/img/{i}.png", Body=make_image(tmp_path / f"{i}.png", seed=i).read_bytes()
        )
    big = make_image(tmp_path / "big.png", size=(400, 300)).read_bytes()  # ~350 kB: above the cap below
    s3.put_object(Bucket="inputs", Key="m/img/big.png", Body=big)
    rows = [
        {"id": "x", "image": "img/0.png"},
        {"id": "y", "image": "s3://inputs/m/img/1.png"},
        {"id": "gone", "image": "img/missing.png"},
        {"id": "big", "image": "img/big.png"},
    ]
    s3.put_object(Bucket="inputs", Key="m/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = write_job(
        tmp_path / "job",
        [],
        tiny_model,
        manifest="s3://inputs/m/manifest.jsonl",
        output="s3://outputs/run",
        inputs={"max_bytes": 100_000},
        shards={"size": 2},
    )
    assert run_job(spec) == Counter(ok=2, failed=2)
    df = results(spec).set_index("id")
    assert df.loc["x", "mp4_uri"].startswith("s3://outputs/run/videos/x-")
    key = df.loc["x", "mp4_uri"].removeprefix("s3://outputs/")
    assert s3.head_object(Bucket="outputs", Key=key)["ContentLength"] > 0
    assert "missing.png" in df.loc["gone", "error"]
    # Refused for its size (which the worker asks S3 for with HEAD, before reading).
    assert "s3://inputs/m/img/big.png is 0.3 MiB, above inputs.max_bytes (0.1 MiB)" in df.loc["big", "error"]
    assert any(o["Key"].startswith("run/metadata/part-") for o in s3.list_objects_v2(Bucket="outputs")["Contents"])
    # Both ok clips went into one WebDataset shard on S3, each as its video and its JSON.
    (shard,) = set(df.loc[["x", "y"], "shard_uri"])
    body = s3.get_object(Bucket="outputs", Key=shard.removeprefix("s3://outputs/"))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    said = [json.loads(data) for name, data in members.items() if name.endswith(".json")]
    assert sorted(j["id"] for j in said) == ["x", "y"] and sum(n.endswith(".mp4") for n in members) == 2


def test_a_job_that_cannot_be_scheduled_says_so(tmp_path: Path, tiny_model: Path, ray_cluster: object) -> None:
    make_image(tmp_path / "img" / "0.png")
    workers = {"count": 1, "resources": {"no_such_accelerator": 1}, "no_progress_timeout_s": 5}
    spec = write_job(tmp_path, [{"id": "z", "image": "img/0.png"}], tiny_model, workers=workers)
    job = Job(load_spec(spec))
    assert job.run() == Counter(failed=1)
    assert "no worker made progress for 5 s" in job.stalled and "no_such_accelerator" in job.stalled
    assert "no_such_accelerator" in results(spec).error.iloc[0]


def test_validate_lists_every_bad_row(tmp_path: Path, tiny_model: Path) -> None:
    rows = [
        {"id": "ok", "image": "a.png"},
        {"id": "h", "image": "a.png", "height": 30},
        {"id": "ok", "image": "b.png"},
        {"id": "g", "image": "a.png", "min_guidance_scale": 5},
    ]
    spec = write_job(tmp_path, rows, tiny_model)
    with (tmp_path / "manifest.jsonl").open("a") as f:
        f.write("{not json\n")
    done = cli("validate", str(spec))
    assert done.returncode == 1
    assert "row 2  id='h'  height: Input should be a multiple of 8" in done.stdout
    assert "row 3  id='ok'  id: duplicate id" in done.stdout
    assert "row 4  id='g'" in done.stdout and "set min <= max" in done.stdout
    assert "row 5" in done.stdout and "not valid JSON" in done.stdout


def test_unknown_spec_key_and_unreachable_storage_exit_2(tmp_path: Path, tiny_model: Path) -> None:
    spec = write_job(tmp_path, [], tiny_model, workerz={"count": 1})
    done = cli("run", str(spec))
    assert done.returncode == 2 and "did you mean 'workers'" in done.stderr
    spec = write_job(tmp_path, [], tiny_model, output="s3://nowhere/x")
    done = cli("run", str(spec), env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})
    assert done.returncode == 2 and "s3://nowhere is not reachable" in done.stderr


@pytest.mark.slow
def test_worker_killed_mid_render_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` kills a worker mid-job in
    test_devices.py::test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows
    (simulated devices: nothing lost, nothing made twice); this one kills a worker running the real
    model."""
    for i in range(8):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    rows = [{"id": f"r{i}", "image": f"img/{i}.png"} for i in range(8)]
    spec = write_job(tmp_path, rows, tiny_model, defaults={**FAST, "num_inference_steps": 4})
    job = Job(load_spec(spec))
    first_batch = threading.Event()
    # The event: the worker's first batch is back, so it is loaded and rendering the next ones.
    job.progress = lambda counts, total: counts.get("ok") and first_batch.set()
    outcome: list[Counter[str]] = []
    thread = threading.Thread(target=lambda: outcome.append(job.run()))
    thread.start()
    assert first_batch.wait(timeout=600), "the worker never returned its first batch"
    (pid,) = wait_until(worker_pids, "the worker process")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert outcome == [Counter(ok=8)]
    df = results(spec)
    assert sorted(df.id) == [f"r{i}" for i in range(8)]  # none lost, none twice
    assert (df.attempt > 1).any()  # the rows of the killed worker were retried
    assert videos_match_metadata(spec)


def test_driver_killed_mid_job_is_resumed_by_rerunning(tmp_path: Path, tiny_model: Path, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """On simulated devices: what a driver's death loses is the ledger's and the lease's logic."""
    for i in range(8):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    rows = [{"id": f"d{i}", "image": f"img/{i}.png"} for i in range(8)]
    spec = write_job(tmp_path, rows, tiny_model, simulate=SIMULATE)
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "svd_batch.cli", "run", str(spec), "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metadata = Path(load_spec(spec).metadata_uri)
    wait_until(lambda: list(metadata.glob("part-*.parquet")) or driver.poll() is not None, "a committed part")
    driver.kill()  # SIGKILL: no cleanup, no final flush
    driver.wait()
    committed = results(spec)
    assert 0 < (committed.status == "ok").sum() < 8  # it died mid-job, with some rows committed
    (killed,) = run_records(spec)
    assert killed.state == "running"
    counts = run_job(spec)
    assert counts["ok"] + counts["skipped"] == 8 and counts["skipped"] == (committed.status == "ok").sum()
    # The rerun took over the killed run's lease, and closed its record.
    lost, rerun = run_records(spec)
    assert (lost.run_id, lost.state, rerun.state) == (killed.run_id, "lost", "finished")
    assert killed.started_at <= lost.ended_at <= rerun.started_at
    df = results(spec)
    ok = df[df.status == "ok"]
    assert sorted(ok.id) == [f"d{i}" for i in range(8)]  # every row exactly once
    assert videos_match_metadata(spec)


def test_a_dead_heads_address_left_by_ray_start_fails_in_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an earlier `ray start` leaves behind when its head has gone: Ray's own default would
    retry "Failed to connect to GCS" without end."""
    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)  # the wait, not what ends it, is 30 s
    with pytest.raises(ClusterError) as failed:
        cluster.resolve("auto")
    assert f"the Ray cluster at {dead} does not answer" in str(failed.value) and "drop --address" in str(failed.value)
    assert cluster.resolve(None) == "local"  # no address: a private local cluster, never that head


@pytest.mark.slow
def test_local_runs_never_join_a_dead_head_and_unreachable_addresses_fail_fast(
    tmp_path: Path, tiny_model: Path
) -> None:
    make_image(tmp_path / "img" / "0.png")
    spec = write_job(tmp_path, [{"id": "a", "image": "img/0.png"}], tiny_model)
    # What an earlier `ray start` leaves behind when its head has gone: Ray's own default would
    # retry "Failed to connect to GCS" without end. (A short folder: Ray's socket paths are bounded.)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    env = {"RAY_TMPDIR": str(ray_tmp)}
    try:
        done = cli("run", str(spec), "--address", "auto", env=env, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        (line,) = [line for line in done.stderr.splitlines() if line.strip()]
        assert f"the Ray cluster at {dead} does not answer" in line and "drop --address" in line
        done = cli("run", str(spec), env=env, timeout=600)  # no address: a private local cluster
        assert done.returncode == 0, done.stderr[-2000:]
        assert results(spec).status.tolist() == ["ok"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_job_control_counts_deaths_per_row_in_flight() -> None:
    control = JobControl()
    assert control.begin("w1", 10, ["a", "b"]) == (False, {})
    control.end("w1")
    assert control.begin("w1", 10, ["c", "d"]) == (False, {})
    # The same worker starts again without ending: it was restarted, with c and d in flight.
    draining, history = control.begin("w1", 11, ["c", "d"])
    assert not draining and history == {"c": History(deaths=1), "d": History(deaths=1)}
    # That batch is now rendered a row per call and only those are in flight: a worker that dies
    # before the first of them (rendering nothing) and starts the batch again charges nobody.
    assert control.in_flight() == []
    control.begin("w1", 12, ["c", "d"])
    assert control.begin("w1", 12, ["c"], True)[1] == {"c": History(deaths=1)}
    assert control.in_flight() == [(12, ["c"])]
    control.end("w1", {"c": {"id": "c"}})
    control.begin("w1", 12, ["d"], True)
    control.timed_out("w1")
    assert control.begin("w1", 13, ["c", "d"])[1] == {"c": History(1, False, {"id": "c"}), "d": History(1, True)}
    control.drain()
    assert control.begin("w2", 14, ["e"]) == (True, {}) and control.in_flight() == []


@pytest.mark.slow
def test_a_row_that_kills_its_worker_every_time_fails_alone(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` covers the deaths charged to the row on the device in
    test_job_control_counts_deaths_per_row_in_flight and
    test_devices.py::test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows."""
    import ray

    rows = rows_and_images(tmp_path, 4)
    rows.insert(1, {"id": "poison", "image": "img/0.png"})
    spec = write_job(tmp_path, rows, tiny_model, workers={"count": 1, "batch_size": 4, "max_attempts": 2})
    job = Job(load_spec(spec))
    outcome: list[Counter[str]] = []
    thread = threading.Thread(target=lambda: outcome.append(job.run()))
    thread.start()
    # Whatever it is in a real night (a kernel crash, the OOM killer), the culprit is played by a
    # real SIGKILL, sent each time a worker's device is rendering the poison row.
    control = wait_until(lambda: run_control(job.run_id), "the run's control actor", timeout=300)
    killed: set[int] = set()
    while thread.is_alive():
        for pid, keys in ray.get(control.on_device.remote()):
            if pid not in killed and any("/poison-" in key for key in keys):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        thread.join(timeout=0.2)
    kills = len(killed)
    assert outcome == [Counter(ok=4, failed=1)]
    df = results(spec).set_index("id")
    poison = df.loc["poison"]
    assert poison.status == "failed" and poison.retryable and poison.attempt == 2
    assert (poison.error_stage, poison.error_type) == ("worker", "WorkerDied")
    assert "WorkerDied: its worker died 2 times while rendering it" in poison.error
    assert kills == 2  # in its batch, then alone; then it was failed without rendering again
    assert (df.drop("poison").status == "ok").all()
    assert (df.drop("poison").attempt <= 2).all()  # the batch-mates were retried once at most
    assert videos_match_metadata(spec)


@pytest.mark.slow
def test_a_row_past_its_timeout_restarts_the_worker_and_fails_retryably(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` covers how a timed-out row is charged in
    test_job_control_counts_deaths_per_row_in_flight and a worker's restart in
    test_devices.py::test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows."""
    slow, fine = rows_and_images(tmp_path, 2)
    rows = [{**slow, "id": "slow", "num_inference_steps": 1000}, {**fine, "id": "fine"}]  # slow: minutes, here
    # One row a call: the slow row times out alone (with batch-mates the worker first finds the
    # culprit one row at a time, as for a poison row).
    spec = write_job(tmp_path, rows, tiny_model, workers={"count": 1, "batch_size": 1, "row_timeout_s": 20})
    assert run_job(spec) == Counter(ok=1, failed=1)
    df = results(spec).set_index("id")
    assert df.loc["fine", "status"] == "ok"
    slow = df.loc["slow"]
    assert (
        slow.status == "failed" and slow.retryable and (slow.error_stage, slow.error_type) == ("worker", "RowTimeout")
    )
    assert "RowTimeout: took longer than workers.row_timeout_s (20 s)" in slow.error
    # Retryable: the next plain run queues it again (no --retry-failed); stopped at once, it is left.
    assert run_job(spec, max_duration=0) == Counter(skipped=1, left=1)


def test_a_run_prints_its_progress_summary_and_locations_and_nothing_else(
    tmp_path: Path,
    tiny_model: Path,
    ray_cluster,  # type: ignore[no-untyped-def]
) -> None:
    """On a simulated device: what a run prints is the driver's; a worker's own output never
    reaches it (Ray's log_to_driver is off), whatever the model prints."""
    make_image(tmp_path / "img" / "0.png")
    spec = write_job(tmp_path, [{"id": "a", "image": "img/0.png"}], tiny_model, simulate=SIMULATE)
    address = ray_cluster.get_runtime_context().gcs_address
    done = cli("run", str(spec), "--address", address, "--max-duration", "1h", env={"COLUMNS": "160"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    expected = [
        # The progress line, as it ends: counts, the rate over the last minutes, ETA, the limit's verdict.
        r"t [━ ]+ 1/1 ok 1  failed 0  skipped 0  [0-9.]+ videos/min  ETA 0:00:00  ends before the 1h limit",
        r" *t  run \S+",  # the summary table's title, its four rules and two rows
        *[r"[┏┃┡│└].*"] * 5,
        rf"videos:   {tmp_path}/outputs/simulated",
        rf"metadata: {tmp_path}/outputs/simulated/metadata",
    ]
    assert len(lines) == len(expected) and all(re.fullmatch(p, s) for p, s in zip(expected, lines, strict=True)), lines


def test_tiny_model_says_where_it_wrote_and_nothing_else(tmp_path: Path) -> None:
    done = cli("tiny-model", str(tmp_path / "m"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout + done.stderr).strip() == f"tiny SVD pipeline written to {tmp_path / 'm'}"
    done = cli("tiny-model", str(tmp_path / "huge"), "--preset", "huge")
    assert done.returncode == 2 and not (tmp_path / "huge").exists()
    assert "--preset 'huge': choose one of tiny, svd, svd-xt" in done.stderr


def test_a_pool_that_cannot_fit_in_host_memory_stops_at_start(
    tmp_path: Path,
    tiny_model: Path,
    ray_cluster,  # type: ignore[no-untyped-def]
) -> None:
    from svd_batch.engine.loader import check_model_dir, worker_memory

    weights = check_model_dir(tiny_model)
    elements = sum(f.stat().st_size for files in weights.values() for f in files) / 4  # fp32 files
    assert worker_memory(weights, "fp32") == pytest.approx(1.2 * 4 * elements + 2**30, rel=0.01)
    assert worker_memory(weights, "fp16") < worker_memory(weights, "fp32")  # it holds what it computes in
    make_image(tmp_path / "img" / "0.png")
    spec = write_job(tmp_path, [{"id": "a", "image": "img/0.png"}], tiny_model, workers={"count": 1000})
    done = cli("run", str(spec), "--address", ray_cluster.get_runtime_context().gcs_address)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert re.fullmatch(
        r"error: workers\.count: 1000 workers need 1\.0 GiB of host memory each \(.*\), and the cluster's nodes "
        r"offer \d+\.\d GiB: \d+ fit\. Lower workers\.count to \d+, use a smaller dtype, or add nodes",
        line,
    ), line
    assert not (tmp_path / "outputs" / "videos").exists()  # nothing rendered


def test_rays_worker_startup_note_is_kept_off_the_runs_stdout() -> None:
    import io

    from svd_batch.terminal import KNOWN_RAYLET_NOTES, _DropLines

    sink = io.StringIO()
    stdout = _DropLines(sink, KNOWN_RAYLET_NOTES)  # type: ignore[arg-type]
    # As Ray prints it: the line, then its newline, in two writes.
    note = (
        "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: abc with address: "
        "10.0.0.1, which is 4x the maximum expected startup concurrency (2). This could be a result of ..."
    )
    for piece in ("videos:   out/demo\n", note, "\n", "metadata: out/", "demo/metadata\n", "no newline"):
        stdout.write(piece)
    assert sink.getvalue() == "videos:   out/demo\nmetadata: out/demo/metadata\n"
    stdout.flush()
    assert sink.getvalue().endswith("metadata\nno newline")

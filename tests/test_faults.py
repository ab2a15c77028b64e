"""Issue 7: storage that breaks mid-job, and secrets that must not leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pandas as pd
import pytest

from chaos.proxy import FaultyS3
from svd_batch.driver import load_spec
from svd_batch.engine.simulated import FINGERPRINT
from svd_batch.ledger import latest, run_history
from svd_batch.metadata import MetadataWriter, read_table
from svd_batch.plan import Planner
from svd_batch.schema import RESULT_SCHEMA, ManifestRow
from svd_batch.storage import S3Storage, StorageError, _s3_client, open_storage
from svd_batch.worker import RowWorker
from tests.helpers import SIMULATE, cli, make_image, rows_and_images, status_counts, wait_until, write_job


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultyS3]:
    faulty = FaultyS3(s3_server)
    yield faulty
    faulty.slowdown_every = 0
    faulty.release.set()


def _bucket(s3_server: str) -> str:
    name = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def _latest(metadata_uri: str) -> pd.DataFrame:
    """One row per video, by the ledger's one definition of the latest row."""
    return latest(read_table(open_storage(metadata_uri))).to_pandas().set_index(["id", "video_index"])


def _videos_in(s3_server: str, bucket: str, prefix: str = "out/videos/") -> set[str]:
    listing = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {f"s3://{bucket}/{o['Key']}" for o in listing.get("Contents", [])}


def _run(spec: Path, proxy: FaultyS3, *args: str, attempts: int = 8) -> subprocess.Popen[str]:
    env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": str(attempts)}
    # A separate local Ray cluster: its workers must see the proxy as their S3 endpoint.
    return subprocess.Popen(
        [sys.executable, "-m", "svd_batch.cli", "run", str(spec), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def test_metadata_commits_wait_out_an_outage(proxy: FaultyS3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = _bucket(proxy.upstream.geturl())
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    _s3_client.cache_clear()
    try:
        writer = MetadataWriter(S3Storage(bucket, "meta"), "r1", flush_rows=1)
        row = {name: None for name in RESULT_SCHEMA.names} | {
            "job": "j", "run_id": "r1", "id": "a", "video_index": 0, "key": "k", "status": "ok", "image": "i",
            "attempt": 1,
        }  # fmt: skip
        proxy.stop()
        writer.add([row])  # the commit fails: the row stays buffered, the job goes on
        with pytest.raises(StorageError, match="1 metadata rows could not be committed"):
            writer.flush(must=True)
        proxy.start()
        writer.add([{**row, "id": "b"}])
        writer.close()
        assert sorted(read_table(S3Storage(bucket, "meta")).column("id").to_pylist()) == ["a", "b"]
    finally:
        _s3_client.cache_clear()


@pytest.mark.slow
def test_s3_slowdown_is_retried_with_backoff(tmp_path: Path, tiny_model: Path, proxy: FaultyS3, s3_server: str) -> None:
    """`make test` writes to a real S3 server in test_job.py::test_s3_manifest_images_output_and_shards
    and fails an upload through the faulty S3 hop in
    test_a_row_whose_gif_upload_fails_after_its_mp4_keeps_no_uri_and_no_video; the retries
    themselves are boto3's."""
    bucket = _bucket(s3_server)
    spec = write_job(tmp_path, rows_and_images(tmp_path, 4), tiny_model, output=f"s3://{bucket}/out")
    proxy.slowdown_every = 3  # one request in three is throttled, metadata and videos alike
    job = _run(spec, proxy)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-2000:]
    assert proxy.throttled >= 4 and any("attempt=2" in a for a in proxy.attempts)
    latest = _latest(f"s3://{bucket}/out/metadata")
    assert (latest.status == "ok").all() and len(latest) == 4
    assert set(latest.mp4_uri) == _videos_in(s3_server, bucket)


@pytest.mark.slow
def test_s3_stopped_mid_job_fails_rows_that_a_rerun_makes(
    tmp_path: Path, tiny_model: Path, proxy: FaultyS3, s3_server: str
) -> None:
    """`make test` covers a failed upload failing only its row in
    test_a_row_whose_gif_upload_fails_after_its_mp4_keeps_no_uri_and_no_video, metadata commits
    waiting out an outage in test_metadata_commits_wait_out_an_outage, and retry on rerun in
    test_job.py::test_rerun_renders_nothing_done_and_retry_failed_retries."""
    bucket = _bucket(s3_server)
    rows = rows_and_images(tmp_path, 6)
    spec = write_job(
        tmp_path,
        rows,
        tiny_model,
        output=f"s3://{bucket}/out",
        metadata=str(tmp_path / "meta"),
        workers={"count": 1, "batch_size": 1},
    )
    job = _run(spec, proxy, attempts=3)
    wait_until(lambda: any("/videos/" in p for p in proxy.puts), "the first video upload")
    proxy.stop()  # the S3 endpoint goes away with the job in full flow
    # Down until a row has failed for it (its upload's retries ran out), then back.
    wait_until(lambda: status_counts(spec).get("failed"), "a row whose upload failed", timeout=600)
    proxy.start()
    _, err = job.communicate(timeout=600)
    assert job.returncode == 1, err[-2000:]  # finished, with failed rows
    first = _latest(str(tmp_path / "meta"))
    failed = first[first.status == "failed"]
    assert len(failed) >= 1 and (first.status == "ok").sum() >= 1
    assert failed.error.str.contains("output: StorageError: upload to s3://").all(), failed.error.tolist()
    # A storage outage is the moment's failure, not the row's: the next plain run makes them.
    assert (failed.error_stage == "output").all() and (failed.error_type == "StorageError").all()
    assert failed.retryable.all() and failed.mp4_uri.isna().all()
    assert set(first[first.status == "ok"].mp4_uri) == _videos_in(s3_server, bucket)

    job = _run(spec, proxy)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-2000:]
    final = _latest(str(tmp_path / "meta"))
    assert len(final) == len(rows) and (final.status == "ok").all()
    made = read_table(open_storage(str(tmp_path / "meta"))).to_pandas()
    assert sorted(made[made.status == "ok"].id) == sorted(r["id"] for r in rows)  # each row made exactly once
    assert set(made[made.status == "ok"].mp4_uri) == _videos_in(s3_server, bucket)


def test_credentials_never_reach_logs_status_metadata_or_report(
    tmp_path: Path, tiny_model: Path, s3_server: str, ray_cluster
) -> None:  # type: ignore[no-untyped-def]
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    bucket = _bucket(s3_server)
    rows = [{"id": "ok", "image": "img/0.png"}, {"id": "gone", "image": f"s3://{bucket}/no/such.png"}]
    make_image(tmp_path / "img" / "0.png")
    spec = write_job(tmp_path, rows, tiny_model, output=f"s3://{bucket}/run", simulate=SIMULATE)
    address = ray_cluster.get_runtime_context().gcs_address
    done = cli("run", str(spec), "--address", address, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # one row failed, and says so
    assert cli("report", load_spec(spec).output).returncode == 0
    seen = {"cli output": done.stdout + done.stderr}
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]:  # status, Parquet parts, report, videos
        seen[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1")
    assert any(key.endswith("_status.json") for key in seen) and any(key.endswith("report.html") for key in seen)
    logs = Path(ray_cluster._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    for file in logs.rglob("*"):
        if file.is_file():
            seen[str(file)] = file.read_bytes().decode("latin-1")
    assert len(seen) > 20
    leaks = [where for where, text in seen.items() if any(secret in text for secret in secrets)]
    assert not leaks


def test_a_job_spec_cannot_run_code(tmp_path: Path, tiny_model: Path) -> None:
    marker = tmp_path / "pwned"
    spec = write_job(tmp_path, [{"id": "a", "image": "a.png"}], tiny_model)
    spec.write_text(spec.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    done = cli("validate", str(spec))
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "python/object/apply" in done.stderr
    assert not marker.exists()


def test_a_row_whose_gif_upload_fails_after_its_mp4_keeps_no_uri_and_no_video(
    tmp_path: Path, tiny_model: Path, proxy: FaultyS3, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker in this process on a simulated device, its S3 behind the faulty hop: what a failed
    upload leaves is the worker's storage logic (the driver commits the row it hands back as any)."""
    bucket = _bucket(s3_server)
    path = write_job(
        tmp_path, rows_and_images(tmp_path, 1), tiny_model, output=f"s3://{bucket}/out", formats=["mp4", "gif"],
        simulate=SIMULATE,
    )  # fmt: skip
    spec = load_spec(path)
    (item,) = Planner(spec, spec.manifest, "r1", FINGERPRINT).resolve(ManifestRow(id="q0", image="img/0.png"), 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.refuse_puts = ".gif"  # the mp4 goes up, then S3 refuses the gif
    _s3_client.cache_clear()
    try:
        (row,) = RowWorker(spec).process([item.work_item()])
    finally:
        _s3_client.cache_clear()
    assert row.status == "failed" and row.error_stage == "output" and row.error_type == "StorageError"
    assert "AccessDenied" in row.error and not row.retryable  # a 403 will not pass by itself
    assert row.mp4_uri is None and row.gif_uri is None
    assert any(p.endswith(".mp4") for p in proxy.puts)  # it was uploaded, and then deleted:
    assert _videos_in(s3_server, bucket, "out/simulated/videos/") == set()


@pytest.mark.slow
def test_a_driver_killed_during_its_final_compaction_is_resumed_by_rerunning(
    tmp_path: Path, tiny_model: Path, proxy: FaultyS3, s3_server: str
) -> None:
    """`make test` kills a driver mid-job and reruns it in
    test_job.py::test_driver_killed_mid_job_is_resumed_by_rerunning (the lease taken over, every row
    once); this one kills it during its last write, to S3."""
    bucket = _bucket(s3_server)
    rows = rows_and_images(tmp_path, 3)
    spec = write_job(
        tmp_path,
        rows,
        tiny_model,
        metadata=f"s3://{bucket}/meta",
        lease_ttl_s=10,
        workers={"count": 1, "batch_size": 1},
    )
    proxy.hold_puts = "-all.parquet"  # the merged file of the run's parts never lands
    job = _run(spec, proxy)
    wait_until(lambda: proxy.held, "the final compaction's upload", timeout=600)
    job.kill()  # kill -9, mid-compaction: its parts are committed, its lease is left behind
    job.communicate(timeout=60)
    proxy.release.set()
    meta = S3Storage(bucket, "meta")
    assert meta.list("_lease") and any(k.startswith("part-") for k in meta.list())

    def lease_is_stale() -> bool:
        (key,) = meta.list("_lease")
        heartbeat = pd.Timestamp(json.loads(meta.get_bytes(key))["heartbeat_at"])
        return (pd.Timestamp.now(tz="UTC") - heartbeat).total_seconds() > 10

    wait_until(lease_is_stale, "the killed run's lease to outlive its TTL", timeout=120)
    proxy.hold_puts = ""
    again = _run(spec, proxy)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert "taking over the lease of run" in err and "over its TTL of 10 s" in err
    made = read_table(meta).to_pandas()
    # Nothing lost and nothing made twice: the rerun found every row done.
    assert sorted(made.id) == sorted(r["id"] for r in rows) and (made.status == "ok").all() and made.key.is_unique
    killed, rerun = run_history(S3Storage(bucket, "runs"))
    # A kill -9 leaves its record running; the run that took over its lease closed it.
    assert killed.state == "lost" and killed.started_at <= killed.ended_at <= rerun.started_at
    assert rerun.counts == {"skipped": 3} and rerun.exit_code == 0

"""`make bench`: the ratios that tell whether svd-batch wastes its accelerators.

Everything runs in one go on this machine with the tiny model, and is printed as a table and
written to bench/results/latest.json. Nothing here is asserted: the numbers are reported.
`python -m bench.run planning` (or jobs, scoring, metadata, loading, devices, startup, datasets) runs some
sections only, and the table says when each section last ran.

1 overhead   1-worker job (Ray, encode, upload) vs a bare in-process loop over the same rows
2 busy       the run record's device_busy: time inside device calls / each worker's span of them
3 batching   bare loop, 4 rows per call vs 1
4 scaling    2 workers vs 1
5 planning   100k, 1M and 10M-row manifests, 99% done: plan time, driver peak RSS and the
             object store's peak; a fresh 1M manifest: seconds to the first video; a rerun
             of a finished 1M job: metadata bytes it writes
6 metadata   rows/s committed to Parquet; part files after a 100k-row run
7 loading    full-size SVD-XT (random weights, built once into .cache/svd-xt): a loading
             process's peak RSS / the size of its weights, and the load time
8 scoring    score time / render time at the tiny model's size; a 576x1024x25 clip's
             frame scores in seconds, beside its MP4 encode
9 devices    simulated devices, N = 1 to 64, at SVD-XT's full size and a small one: videos/s,
             efficiency, device busy, CPU seconds per video by stage, driver RSS, object
             store peak, with the worker as it was (render, then write) beside (bench/devices.py)
10 startup   seconds from `svd-batch run`'s launch to the first video on a fresh 1M-row
             manifest, and a worker's start part by part (bench/startup.py)
11 datasets  a fresh 1M-sample WebDataset manifest (100 shards, small images and captions)
             beside the 1M-row JSONL manifest of files: planning's rate and the first video
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import svd_batch  # noqa: F401  (protobuf implementation, before ray)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "bench"
RESULTS = ROOT / "bench" / "results"
ROWS = 24
PARAMS = {"height": 32, "width": 32, "num_frames": 4, "num_inference_steps": 2, "decode_chunk_size": 4}


def tiny_model() -> Path:
    from svd_batch.engine.checkpoints import ensure_checkpoint

    return ensure_checkpoint()


def write_job(name: str, rows: int, workers: int, batch: int, model: Path) -> Path:
    from jobs.demo.make_inputs import picture

    folder = WORK / name
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        picture(i, (48, 40)).save(folder / "img" / f"{i}.png")
    manifest = "".join(json.dumps({"id": f"b{i}", "image": f"img/{i}.png"}) + "\n" for i in range(rows))
    (folder / "manifest.jsonl").write_text(manifest)
    spec = {
        "name": name,
        "manifest": "manifest.jsonl",
        "output": str(folder / f"out-{time.time_ns()}"),
        "model": {"path": str(model)},
        "defaults": PARAMS,
        "formats": ["mp4"],
        "workers": {"count": workers, "batch_size": batch},
        "seed": 0,
    }
    (folder / "job.yaml").write_text(json.dumps(spec))
    return folder / "job.yaml"


def _batches(model: Path, batch: int) -> tuple[Any, list[list[Any]]]:
    """An in-process renderer, warmed up as a worker's first call is, and ROWS requests in batches."""
    from jobs.demo.make_inputs import picture
    from svd_batch.engine.loader import load_pipeline
    from svd_batch.engine.renderer import Renderer, VideoRequest
    from svd_batch.images import fit
    from svd_batch.schema import ModelSpec, RenderParams

    renderer = Renderer(load_pipeline(ModelSpec(path=model)), max_batch=batch)
    params = renderer.resolve(RenderParams(**PARAMS))
    requests = [VideoRequest(fit(picture(i, (48, 40)), 32, 32, "crop"), params, i) for i in range(ROWS)]
    renderer.render(requests[:1])
    return renderer, [requests[first : first + batch] for first in range(0, ROWS, batch)]


def bare_loop(model: Path, batch: int) -> float:
    """Videos per second of the pipeline alone: no Ray, no encoding, no upload."""
    renderer, batches = _batches(model, batch)
    start = time.perf_counter()
    for requests in batches:
        renderer.render(requests)
    return ROWS / (time.perf_counter() - start)


def scoring(model: Path) -> dict[str, Any]:
    """What scoring costs. At the tiny model's size: as a fraction of render time, the way a
    worker scores (frame scores per video, one image-encoder call per batch). At SVD-XT's
    576x1024x25 (frames only, no model): seconds, beside the MP4 encode of the same clip."""
    import tempfile

    import numpy as np

    from svd_batch.encode import encode
    from svd_batch.scores import consistency, score_clip

    renderer, batches = _batches(model, 4)
    rendering = scoring_s = 0.0
    for requests in batches:
        started = time.perf_counter()
        videos = renderer.render(requests)
        rendering += time.perf_counter() - started
        started = time.perf_counter()
        fitted = [np.asarray(r.image) for r in requests]
        similar = consistency(renderer.image_embeddings, fitted, [v.frames for v in videos])
        for image, video, c in zip(fitted, videos, similar, strict=True):
            score_clip(video.frames, image, c)
        scoring_s += time.perf_counter() - started
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (576, 1024 + 25 * 4, 3), dtype=np.uint8)
    clip = np.stack([canvas[:, 4 * i : 4 * i + 1024] for i in range(25)])  # a 4 px/frame pan
    started = time.perf_counter()
    full = score_clip(clip, clip[0])
    full_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        encode(clip, "mp4", 7.0, Path(tmp), "clip")
        encode_s = time.perf_counter() - started
    return {
        "tiny_fraction": scoring_s / rendering,
        "tiny_score_s_per_video": scoring_s / ROWS,
        "tiny_render_s_per_video": rendering / ROWS,
        "full_score_s": full_s,
        "full_encode_s": encode_s,
        "full_motion": full.motion,
    }


def job_run(model: Path, workers: int, batch: int) -> dict[str, Any]:
    """Steady-state videos/s of a real job, from its own metadata.

    Like the bare loop, which discards a warm-up call, each worker's first batch (model load
    and MindSpore's first-call setup) is left out: the window runs from the end of the first
    batch any worker finished to the end of the last one.
    """
    import pandas as pd

    from svd_batch.driver import Job, load_spec
    from svd_batch.metadata import read_table
    from svd_batch.storage import open_storage

    spec = load_spec(write_job(f"job-{workers}w", ROWS, workers, batch, model))
    job = Job(spec)
    job.run()
    df = read_table(open_storage(spec.metadata_uri)).to_pandas()
    df = df[df.status == "ok"]
    # A batch's rows start within milliseconds of each other; the next batch seconds later.
    first = df.started_at <= df.groupby("worker").started_at.transform("min") + pd.Timedelta(seconds=1)
    window_start = df[first].groupby("worker").ended_at.max().min()
    steady = df[~first]
    span = (steady.ended_at.max() - window_start).total_seconds()
    assert job.record is not None
    busy = job.record.device_busy
    return {"videos_per_s": len(steady) / span, "busy": busy, "rows": len(df), "steady_rows": len(steady)}


# The object store's peak is sampled by a process of its own, so that sampling (memory_summary
# builds large reports) never counts in the driver's peak RSS.
SAMPLER = """
import re, sys, time
import ray
from ray._private.internal_api import memory_summary
ray.init(address=sys.argv[1], log_to_driver=False)
peak = 0.0
while True:
    found = re.search(r"Plasma memory usage (\\d+) MiB", memory_summary(stats_only=True))
    if found and float(found.group(1)) > peak:
        peak = float(found.group(1))
        print(peak, flush=True)
    time.sleep(0.5)
"""

# A child's peak RSS, from the kernel's high-water mark of its own memory: getrusage's
# ru_maxrss survives exec, so a child forked from a large bench process would report the
# bench's size, not its own.
PEAK = """
def peak_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
"""

PLAN_SCRIPT = (
    "import time\nbegun = time.perf_counter()  # the process's start: imports and Ray's local start count\n"
    + PEAK
    + """
import json, subprocess, sys, time
import svd_batch
import ray
from pathlib import Path
from svd_batch.driver import Job, load_spec
context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
mode, first = sys.argv[2], []
sampler = subprocess.Popen([sys.executable, "-c", sys.argv[3], context.address_info["gcs_address"]],
                           stdout=subprocess.PIPE, text=True)

def seen(counts, total):
    if counts.get("ok") and not first:
        first.extend([time.perf_counter() - start, time.perf_counter() - begun])
        job.drain("bench: first video")

# plan: stopped before it starts, so the run only plans (and counts what it leaves).
job = Job(load_spec(Path(sys.argv[1])), max_duration=0 if mode == "plan" else None,
          progress=seen if mode == "first" else None)
start = time.perf_counter()
counts = job.run()
seconds = time.perf_counter() - start
sampler.terminate()
peaks = sampler.communicate()[0].split()
print(json.dumps({"seconds": seconds, "first_video_s": first[0] if first else None,
                  "first_video_cold_s": first[1] if first else None, "counts": dict(counts),
                  "peak_rss_mb": peak_bytes() / 2**20,
                  "object_store_peak_mib": float(peaks[-1]) if peaks else 0.0}))
"""
)


def _piece_keys(spec: Any, run_id: str, weights: str, piece: Any, every: int) -> tuple[list[str], list[str]]:
    from svd_batch.manifest import read_piece
    from svd_batch.plan import Planner

    planner = Planner(spec, spec.manifest, run_id, weights)
    keys, ids = [], []
    for number, row in read_piece(piece, ()):
        if every and number % every == 0:
            continue
        for video in planner.resolve(row, number):
            keys.append(video.key)
            ids.append(video.id)
    return keys, ids


def _done_metadata(spec: Any, every: int) -> int:
    """An earlier run's metadata, written straight as Arrow: an `ok` row for every row but each
    `every`-th (0: every row). Keys come from the per-row planner (plan.Planner.resolve, in two
    processes), so they are the ones a run looks for, found without the columnar planner."""
    import functools
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    from svd_batch.driver import new_run_id
    from svd_batch.engine.loader import check_model_dir, fingerprint
    from svd_batch.manifest import survey
    from svd_batch.schema import RESULT_SCHEMA

    weights = fingerprint(spec.model.path, check_model_dir(spec.model.path))
    # Built once per manifest, model and share done (10M rows take minutes), then copied in.
    home = Path(spec.manifest) if Path(spec.manifest).is_dir() else Path(spec.manifest).parent  # shards: a folder
    cached = home / f"done-{every}-{weights[:12]}.parquet"
    if cached.exists():
        shutil.copy(cached, Path(spec.metadata_uri) / "part-earlier-all.parquet")
        return pq.ParquetFile(cached).metadata.num_rows
    run_id = new_run_id()
    keys, ids = [], []
    work = functools.partial(_piece_keys, spec, run_id, weights, every=every)
    with ProcessPoolExecutor(2) as pool:
        for piece_keys, piece_ids in pool.map(work, survey(spec.manifest).pieces):
            keys += piece_keys
            ids += piece_ids
    n = len(keys)
    columns = {
        "job": pa.array([spec.name] * n),
        "run_id": pa.array([run_id] * n),
        "id": pa.array(ids),
        "video_index": pa.array([0] * n, pa.int64()),
        "key": pa.array(keys),
        "status": pa.array(["ok"] * n),
        "mp4_uri": pa.array([f"s3://b/{k}.mp4" for k in keys]),
        "image": pa.array(["img.png"] * n),
        "ended_at": pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC")),
    }
    table = pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in RESULT_SCHEMA], schema=RESULT_SCHEMA)
    pq.write_table(table, cached, compression="zstd")
    shutil.copy(cached, Path(spec.metadata_uri) / "part-earlier-all.parquet")
    return n


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def manifest_folder(rows: int) -> Path:
    """A folder with a synthetic manifest of `rows` rows over 1,000 images, made once."""
    folder = WORK / f"plan-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    if not (folder / "img").is_dir():
        from jobs.demo.make_inputs import picture

        (folder / "img").mkdir()
        for i in range(1000):
            picture(i, (48, 40)).save(folder / "img" / f"{i}.png")
    if not manifest.exists():
        with manifest.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"row-{i:08d}", "image": f"img/{i % 1000}.png", "tags": {"shard": i % 64}}))
                f.write("\n")
    return folder


SHARD_SAMPLES = 10_000  # img2dataset's default


def shards_folder(rows: int) -> Path:
    """`rows` samples as WebDataset shards of SHARD_SAMPLES (a 16x16 JPEG and a caption each,
    over 1,000 pictures), made once: the dataset form of manifest_folder's rows."""
    import io
    import tarfile

    from jobs.demo.make_inputs import picture

    folder = WORK / f"wds-{rows}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = []
    for i in range(1000):
        data = io.BytesIO()
        picture(i, (16, 16)).save(data, "JPEG")
        jpegs.append(data.getvalue())
    for shard in range(-(-rows // SHARD_SAMPLES)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for n in range(shard * SHARD_SAMPLES, min(rows, (shard + 1) * SHARD_SAMPLES)):
                for extension, data in (("jpg", jpegs[n % 1000]), ("txt", f"picture {n}".encode())):
                    member = tarfile.TarInfo(f"{n:09d}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    (folder / "done").touch()
    return folder


def planning(model: Path, rows: int, mode: str, every: int | None, kind: str = "jsonl") -> dict[str, Any]:
    """A job on a synthetic manifest, in a fresh process so its peak RSS is its own. `every`:
    an earlier run made all rows but each every-th (0: all of them; None: no earlier run).
    mode plan: planning alone (the run is stopped before it starts); first: until the first
    video is committed; run: a whole run. kind parquet: the same rows as a Parquet manifest
    in row groups of 64k rows (pieces are whole row groups: one group of 1M rows, pyarrow's
    default size, would be one piece); webdataset: the rows as shards (shards_folder)."""
    import shutil

    from svd_batch.driver import load_spec

    folder = manifest_folder(rows)
    manifest = folder / "manifest.jsonl"
    if kind == "parquet" and not (folder / "manifest.parquet").exists():
        import pyarrow.json as pj
        import pyarrow.parquet as pq

        pq.write_table(pj.read_json(manifest), folder / "manifest.parquet", row_group_size=65536)
    if kind == "webdataset":
        folder = shards_folder(rows)
    spec_path = folder / "job.yaml"
    spec_path.write_text(
        json.dumps(
            {
                "name": "plan",
                "manifest": "." if kind == "webdataset" else f"manifest.{kind}",
                "output": "out",
                "model": {"path": str(model)},
                "defaults": PARAMS,
            }
        )
    )
    spec = load_spec(spec_path)
    shutil.rmtree(spec.output, ignore_errors=True)
    shutil.rmtree(spec.runs_uri, ignore_errors=True)
    Path(spec.metadata_uri).mkdir(parents=True)
    done = _done_metadata(spec, every) if every is not None else 0
    before = _size(Path(spec.output).parent)
    out = subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, str(spec_path), mode, SAMPLER],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "done_before": done, "bytes_written": _size(Path(spec.output).parent) - before, **result}


def metadata_rate(rows: int = 100_000) -> dict[str, Any]:
    from svd_batch.metadata import MetadataWriter
    from svd_batch.schema import RenderParams, ResultRow, Status
    from svd_batch.storage import LocalStorage

    folder = WORK / "metadata"
    storage = LocalStorage(folder)
    for key in storage.list():
        storage.delete(key)
    params = RenderParams(**PARAMS)
    now = dt.datetime.now(dt.UTC)
    batch = [
        ResultRow(
            job="m",
            run_id="r",
            id=f"id-{i}",
            video_index=0,
            key=f"videos/id-{i}-0123456789abcdef-v0",
            status=Status.ok,
            mp4_uri=f"s3://bucket/videos/id-{i}.mp4",
            seed=i,
            params=params,
            image="x.png",
            input_width=1024,
            input_height=576,
            input_sha256="0" * 64,
            model_sha256="1" * 64,
            denoise_s=1.0,
            decode_s=0.1,
            encode_s=0.1,
            upload_s=0.1,
            started_at=now,
            ended_at=now,
        )
        for i in range(1000)
    ]
    writer = MetadataWriter(storage, "r")
    start = time.perf_counter()
    for _ in range(rows // len(batch)):
        writer.add(batch)  # a worker's results arrive a batch at a time
    parts_before_merge = writer.parts + 1  # the last, partial part is committed by close()
    writer.close()
    elapsed = time.perf_counter() - start
    files = list(folder.glob("*.parquet"))
    return {
        "rows": rows,
        "rows_per_s": rows / elapsed,
        "parts_committed": parts_before_merge,
        "files_after": len(files),
        "bytes_after": sum(f.stat().st_size for f in files),
    }


LOAD_SCRIPT = (
    PEAK
    + """
import json, sys, time
import svd_batch
import mindspore, mindone.diffusers, mindone.transformers
from pathlib import Path
from svd_batch.engine.loader import load_pipeline
from svd_batch.schema import ModelSpec
runtime = peak_bytes()
start = time.perf_counter()
load_pipeline(ModelSpec(path=Path(sys.argv[1])))
print(json.dumps({"seconds": time.perf_counter() - start, "runtime_bytes": runtime,
                  "peak_rss_bytes": peak_bytes()}))
"""
)


def loading(preset: str = "svd-xt") -> dict[str, Any]:
    """Load a full-size preset in a fresh process, as a worker does, and compare its peak RSS
    with the bytes of its weights. The preset is built the first time (about 9 GB of disk)."""
    from svd_batch.engine.checkpoints import ensure_checkpoint

    start = time.perf_counter()
    model = ensure_checkpoint(preset=preset)
    built_s = time.perf_counter() - start
    weights = sum(f.stat().st_size for f in model.rglob("*.safetensors"))
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(model)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    return {**result, "preset": preset, "weight_bytes": weights, "build_s": built_s,
            "ratio": result["peak_rss_bytes"] / weights}  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import mindspore
    import ray

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mindspore": mindspore.__version__,
        "ray": ray.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


SECTIONS = ("jobs", "planning", "metadata", "loading", "scoring", "devices", "startup", "datasets")
PLANNING: list[tuple[Any, ...]] = [  # name, rows, mode, done (all but each every-th row; 0: all; None: none)[, kind]
    ("plan_100k", 100_000, "plan", 100),
    ("plan_1m", 1_000_000, "plan", 100),
    ("plan_10m", 10_000_000, "plan", 100),
    ("plan_1m_parquet", 1_000_000, "plan", 100, "parquet"),
    ("first_1k", 1_000, "first", None),  # the same job on a small manifest: worker start and first call
    ("first_1m", 1_000_000, "first", None),
    ("rerun_1m", 1_000_000, "run", 0),
]
DATASETS: list[tuple[Any, ...]] = [  # the same, side by side: files in a JSONL manifest, and shards
    # A rerun of a finished job: planning reads every row (every sample), makes its keys and
    # finds them done; a stopped run would leave the shards unread.
    ("rerun_1m_files", 1_000_000, "run", 0),
    ("rerun_1m_shards", 1_000_000, "run", 0, "webdataset"),
    ("first_1m_files", 1_000_000, "first", None),
    ("first_1m_shards", 1_000_000, "first", None, "webdataset"),
]


def main(sections: list[str]) -> None:
    """Run the named sections (all by default); a partial run keeps the other sections'
    last results in latest.json, and the table says when each section ran."""
    import ray

    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown bench section {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    sections = sections or list(SECTIONS)
    latest = RESULTS / "latest.json"
    partial = latest.exists() and len(sections) < len(SECTIONS)
    results: dict[str, Any] = json.loads(latest.read_text()) if partial else {}
    results.update({"machine": machine(), "rows": ROWS, "params": PARAMS})
    ran = results.setdefault("ran", {})
    model = tiny_model()
    if "jobs" in sections:
        results["bare_batch1_vps"] = bare_loop(model, 1)
        results["bare_batch4_vps"] = bare_loop(model, 4)
        from svd_batch import WORKER_ENV

        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": WORKER_ENV},
        )
        results["job_1w"] = job_run(model, 1, 4)
        results["job_2w"] = job_run(model, 2, 4)
        ray.shutdown()
    if "scoring" in sections:
        results["scoring"] = scoring(model)
    if "planning" in sections:
        for name, *point in PLANNING:
            results[name] = planning(model, *point)
            print(name, json.dumps(results[name]), flush=True)
    if "datasets" in sections:
        for name, *point in DATASETS:
            results[name] = planning(model, *point)
            print(name, json.dumps(results[name]), flush=True)
    if "metadata" in sections:
        results["metadata"] = metadata_rate()
    if "loading" in sections:
        results["loading"] = loading()
    if "devices" in sections:
        from bench import devices

        results["devices"] = devices.run(WORK, SAMPLER)
    if "startup" in sections:
        from bench import startup

        results["startup"] = startup.run(model, PARAMS, manifest_folder(1_000_000), ROOT)
    ran.update(dict.fromkeys(sections, results["machine"]["date"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


def _jobs_rows(r: dict[str, Any]) -> list[str]:
    j1, j2 = r["job_1w"], r["job_2w"]
    busy1, busy2 = j1["busy"], j2["busy"]
    return [
        f"| 1 overhead: 1-worker job / bare loop (videos/s, batch 4) | {j1['videos_per_s']:.3f} / "
        f"{r['bare_batch4_vps']:.3f} = **{j1['videos_per_s'] / r['bare_batch4_vps']:.2f}** | >= 0.90 |",
        f"| 2 device busy (mean over workers), 1 worker; 2 workers | **{busy1:.2f}**; {busy2:.2f} | >= 0.95 |",
        f"| 3 batching: 4 rows/call vs 1 (bare loop) | {r['bare_batch4_vps']:.3f} / {r['bare_batch1_vps']:.3f} = "
        f"**{r['bare_batch4_vps'] / r['bare_batch1_vps']:.2f}x** | |",
        f"| 4 scaling: 2 workers vs 1 | {j2['videos_per_s']:.3f} / {j1['videos_per_s']:.3f} = "
        f"**{j2['videos_per_s'] / j1['videos_per_s']:.2f}x** | (2 cores) |",
    ]


def _scoring_rows(r: dict[str, Any]) -> list[str]:
    sc = r["scoring"]
    return [
        f"| 8 scoring, tiny model: score time / render time (per video {sc['tiny_score_s_per_video'] * 1e3:.0f} ms "
        f"/ {sc['tiny_render_s_per_video']:.2f} s) | **{sc['tiny_fraction']:.1%}** | < 5% |",
        f"| 8 scoring a 576x1024x25 clip (frames only): seconds; / its MP4 encode ({sc['full_encode_s']:.2f} s) | "
        f"**{sc['full_score_s']:.2f} s**; {sc['full_score_s'] / sc['full_encode_s']:.2f}x | |",
    ]


def _planning_rows(r: dict[str, Any]) -> list[str]:
    p1, pm, p10, f1, r1 = r["plan_100k"], r["plan_1m"], r["plan_10m"], r["first_1m"], r["rerun_1m"]
    pp = r["plan_1m_parquet"]
    return [
        f"| 5 planning 10M rows, 9.9M done: seconds; driver peak RSS; object store peak | "
        f"**{p10['seconds']:.1f} s**; **{p10['peak_rss_mb']:.0f} MiB**; {p10['object_store_peak_mib']:.0f} MiB | "
        "< 120 s; < 1 GiB |",
        f"| 5 planning 1M rows, 990k done: seconds; driver peak RSS; object store peak | "
        f"{pm['seconds']:.1f} s; {pm['peak_rss_mb']:.0f} MiB; {pm['object_store_peak_mib']:.0f} MiB | |",
        f"| 5 planning 1M rows as Parquet, 990k done: seconds; driver peak RSS; object store peak | "
        f"{pp['seconds']:.1f} s; {pp['peak_rss_mb']:.0f} MiB; {pp['object_store_peak_mib']:.0f} MiB | |",
        f"| 5 planning 100k rows, 99k done: seconds; driver peak RSS; object store peak | {p1['seconds']:.1f} s; "
        f"{p1['peak_rss_mb']:.0f} MiB; {p1['object_store_peak_mib']:.0f} MiB | RSS flat |",
        f"| 5 fresh manifest: seconds from `run` to the first committed video, 1M rows; 1k rows "
        f"(from the process's start, with Ray's local start: 1M; 1k) | **{f1['first_video_s']:.1f} s**; "
        f"{r['first_1k']['first_video_s']:.1f} s ({f1['first_video_cold_s']:.1f} s; "
        f"{r['first_1k']['first_video_cold_s']:.1f} s) | < 30 s |",
        f"| 5 rerun of a finished 1M-row job: metadata written; rendered | "
        f"**{r1['bytes_written'] / 1e6:.3f} MB**; {r1['counts'].get('ok', 0)} | < 1 MB; 0 |",
    ]


def _metadata_rows(r: dict[str, Any]) -> list[str]:
    m = r["metadata"]
    return [
        f"| 6 metadata: rows/s committed; parts committed -> files after a 100k-row run | "
        f"**{m['rows_per_s']:,.0f}**; {m['parts_committed']} -> {m['files_after']} file "
        f"({m['bytes_after'] / 1e6:.1f} MB) | |",
    ]


def _loading_rows(r: dict[str, Any]) -> list[str]:
    ld = r["loading"]
    return [
        f"| 7 loading {ld['preset']}: peak RSS / weights; load time | {ld['peak_rss_bytes'] / 2**30:.1f} GiB / "
        f"{ld['weight_bytes'] / 2**30:.1f} GiB = **{ld['ratio']:.2f}**; {ld['seconds']:.0f} s | <= 1.3 |",
    ]


def _devices_rows(r: dict[str, Any]) -> list[str]:
    from bench import devices

    return devices.rows(r["devices"], r["machine"]["cores"])


def _datasets_rows(r: dict[str, Any]) -> list[str]:
    files, shards = r["rerun_1m_files"], r["rerun_1m_shards"]
    rate = [p["rows"] / p["seconds"] for p in (files, shards)]
    first = [r[name]["first_video_s"] for name in ("first_1m_files", "first_1m_shards")]
    return [
        f"| 11 a rerun of a finished 1M-row job (every row read, keyed, found done): rows/s, files (JSONL, "
        f"columnar) / shards (WebDataset, images read) | {rate[0]:,.0f} / {rate[1]:,.0f}; "
        f"**{rate[1] / rate[0]:.2f}x** | |",
        f"| 11 the same: driver peak RSS; object store peak, files / shards | {files['peak_rss_mb']:.0f} / "
        f"{shards['peak_rss_mb']:.0f} MiB; {files['object_store_peak_mib']:.0f} / "
        f"{shards['object_store_peak_mib']:.0f} MiB | |",
        f"| 11 seconds from `run` to the first committed video, files / shards | {first[0]:.1f} / "
        f"**{first[1]:.1f} s** | |",
    ]


def _startup_rows(r: dict[str, Any]) -> list[str]:
    from bench import startup

    return startup.rows(r["startup"])


ROWS_OF = {"jobs": _jobs_rows, "planning": _planning_rows, "metadata": _metadata_rows, "loading": _loading_rows,
           "scoring": _scoring_rows, "devices": _devices_rows, "startup": _startup_rows,
           "datasets": _datasets_rows}  # fmt: skip


def table(r: dict[str, Any]) -> str:
    """The sections on record (a machine where only some have run shows those)."""
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; mindspore {r['machine']['mindspore']}, "
        f"ray {r['machine']['ray']}; sections run "
        + ", ".join(f"{name} {when}" for name, when in r.get("ran", {}).items()),
        f"tiny model, {r['rows']} rows, {r['params']}",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
    ]
    for name in SECTIONS:
        if name in r.get("ran", {}):
            lines += ROWS_OF[name](r)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])

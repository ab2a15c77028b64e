"""`make bench` section "devices": the system at the shape and scale it exists for, on simulated
devices (svd_batch/engine/simulated.py), 1 to 64 of them on this machine.

Each point is a whole job in a fresh process with a fresh local Ray cluster (so the driver's
peak RSS is its own): planning, workers, scores, encode, upload, metadata and ledger are the
real ones; only the pipeline call is a device that sleeps SECONDS per video. Each point runs
twice: with `workers.calls: 2` (a batch renders while the last one is written) and with
`calls: 1`, the worker as it was before (it renders, then writes, in turn).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPES = {  # name: (height, width, frames, seconds per video, videos per device)
    "full": (576, 1024, 25, 18.0, 4),  # SVD-XT's size, at one H200's 18.1 s a video (docs/platform.md)
    "small": (256, 448, 14, 2.0, 6),
}
COUNTS = (1, 2, 4, 8, 16, 32, 64)
CORES_USABLE = 0.8  # of the machine's cores, for the CPU stage: the driver and Ray need the rest

SCRIPT = """
import json, subprocess, sys, time
import svd_batch
import ray
from pathlib import Path
from svd_batch.driver import Job, load_spec
from svd_batch.engine.simulated import RESOURCE

def peak_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

context = ray.init(address="local", num_cpus=2, resources={RESOURCE: 64}, include_dashboard=False, log_to_driver=False)
sampler = subprocess.Popen([sys.executable, "-c", sys.argv[3], context.address_info["gcs_address"]],
                           stdout=subprocess.PIPE, text=True)
job = Job(load_spec(Path(sys.argv[1]), simulate=float(sys.argv[2])))
start = time.perf_counter()
counts = job.run()
seconds = time.perf_counter() - start
sampler.terminate()
# Only its numbers: Ray may write a note of its own to the sampler's stdout.
peaks = [float(word) for word in sampler.communicate()[0].split() if word.replace(".", "", 1).isdigit()]
print(json.dumps({"seconds": seconds, "counts": dict(counts), "driver_peak_rss_mb": peak_bytes() / 2**20,
                  "object_store_peak_mib": max(peaks, default=0.0),
                  "record": job.record.model_dump(mode="json")}))
"""


def _inputs(folder: Path, count: int) -> None:
    from jobs.demo.make_inputs import picture

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if not (folder / "img" / f"{i}.png").exists():
            picture(i, (448, 256)).save(folder / "img" / f"{i}.png")


def steady_videos_per_s(metadata: str) -> float:
    """Videos per second once every device has made its first: per worker, the device calls it
    ended after its first over the time between its first and its last, summed over workers.
    Device calls, not written rows: a row's CPU work after its call varies with what else the
    CPU does, while its device's pace is what the run can sustain (a device whose CPU work
    falls behind is held back, which shows here)."""
    from svd_batch.metadata import read_table
    from svd_batch.storage import open_storage

    df = read_table(open_storage(metadata), ["worker", "status", "device_ended_at"]).to_pandas()
    rate = 0.0
    for _, rows in df[df.status == "ok"].groupby("worker"):
        ends = rows.device_ended_at.drop_duplicates().sort_values()
        if len(ends) > 1:
            rate += (len(ends) - 1) / (ends.iloc[-1] - ends.iloc[0]).total_seconds()
    return rate


def _wait_for_workers_to_leave(timeout: float = 120.0) -> None:
    """The last point's workers take seconds to exit after its job; a new local cluster started
    meanwhile reads less free memory (11.6 GiB instead of 16.3 GiB, right after 64 workers), and
    the job's own check then refuses its pool."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if "SpecRayWorker" in " ".join(process.info["cmdline"] or []):
                    alive.append(process)
        if not alive:
            return
        time.sleep(1.0)


def point(work: Path, shape: str, devices: int, calls: int, sampler: str) -> dict[str, Any]:
    height, width, frames, seconds, per_device = SHAPES[shape]
    folder = work / "devices"
    rows = devices * per_device
    _inputs(folder, rows)
    name = f"{shape}-{devices}-{calls}"
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"d{i}", "image": f"img/{i}.png"}) + "\n" for i in range(rows)))
    spec = folder / f"{name}.yaml"
    output = folder / f"out-{name}-{os.getpid()}"
    spec.write_text(
        json.dumps(
            {
                "name": name,
                "manifest": manifest.name,
                "output": str(output),
                "model": {"path": "simulated"},
                "defaults": {"height": height, "width": width, "num_frames": frames},
                "workers": {"count": devices, "batch_size": 1, "calls": calls},
            }
        )
    )
    _wait_for_workers_to_leave()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(spec), str(seconds), sampler],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    found = [line for line in done.stdout.splitlines() if line.startswith('{"seconds"')]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"devices {name}: {done.stdout[-2000:]} {done.stderr[-3000:]}")
    result = json.loads(found[-1])
    record = result.pop("record")
    vps = steady_videos_per_s(str(output / "simulated" / "metadata"))
    cpu = record["cpu_s_per_video"]
    return {
        "shape": shape,
        "devices": devices,
        "calls": calls,
        "seconds_per_video": seconds,
        "rows": rows,
        "videos_per_s": vps,
        "efficiency": vps / (devices / seconds),
        "device_busy": record["device_busy"],
        "cpu_s_per_video": cpu,
        "cores_needed": devices * sum(cpu.values()) / seconds,
        "frames_peak_mb": record["frames_peak_mb"],
        **result,
    }


def run(work: Path, sampler: str) -> list[dict[str, Any]]:
    """Every point, each written to points.jsonl as it ends: a section of 40 minutes that breaks
    off resumes where it stopped (delete the file for a fresh one)."""
    done = work / "devices" / "points.jsonl"
    points = [json.loads(line) for line in done.read_text().splitlines()] if done.exists() else []
    have = {(p["shape"], p["devices"], p["calls"]) for p in points}
    for shape in SHAPES:
        for devices in COUNTS:
            for calls in (2, 1):
                if (shape, devices, calls) in have:
                    continue
                points.append(point(work, shape, devices, calls, sampler))
                with done.open("a") as file:
                    file.write(json.dumps(points[-1]) + "\n")
                print("devices", json.dumps(points[-1]), flush=True)
    return points


def rows(points: list[dict[str, Any]], cores: int) -> list[str]:
    """The table, then the sizing rule it implies and where this machine's cores run out."""
    lines = [
        "",
        "| devices section: shape, N | videos/s (ideal) | efficiency, calls 2 / 1 | device busy, calls 2 / 1 | "
        "CPU s/video: score, encode, upload | cores needed | driver RSS | object store peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # In SHAPES' order and by N, however the points came: a resumed run appends them as they end.
    shapes = list(SHAPES)
    points = sorted(points, key=lambda p: (shapes.index(p["shape"]), p["devices"]))
    by = {(p["shape"], p["devices"], p["calls"]): p for p in points}
    for (shape, devices, calls), p in by.items():
        if calls != 2:
            continue
        before = by.get((shape, devices, 1))
        then = (f"{before['efficiency']:.3f}", f"{before['device_busy']:.3f}") if before else ("not run", "not run")
        cpu = p["cpu_s_per_video"]
        fits = p["cores_needed"] <= CORES_USABLE * cores
        lines.append(
            f"| {shape} {SHAPES[shape][0]}x{SHAPES[shape][1]}x{SHAPES[shape][2]} at {p['seconds_per_video']:g} s, "
            f"N={devices} | {p['videos_per_s']:.3f} ({devices / p['seconds_per_video']:.3f}) | "
            f"**{p['efficiency']:.3f}** / {then[0]} | {p['device_busy']:.3f} / "
            f"{then[1]} | {cpu['score']:.2f}, {cpu['encode']:.2f}, {cpu['upload']:.3f} | "
            f"{p['cores_needed']:.2f}{'' if fits else ' (more than fit)'} | {p['driver_peak_rss_mb']:.0f} MiB | "
            f"{p['object_store_peak_mib']:.0f} MiB |"
        )
    for shape, (height, width, frames, seconds, _) in SHAPES.items():
        cpu = [sum(p["cpu_s_per_video"].values()) for p in points if p["shape"] == shape and p["calls"] == 2]
        if not cpu:
            continue
        per_video = sorted(cpu)[len(cpu) // 2]
        per_device = per_video / seconds
        lines.append(
            f"\nSizing, {shape} ({height}x{width}x{frames}, {seconds:g} s a video): {per_video:.2f} CPU s per video "
            f"(median over N) = **{per_device:.3f} cores per device**; this machine's {cores} cores "
            f"({CORES_USABLE:.0%} of them for the CPU stage) keep up with "
            f"{int(CORES_USABLE * cores / per_device)} devices at this shape."
        )
    return lines

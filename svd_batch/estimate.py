"""Before a night starts: how long its job will take, measured on its own model and rows.

The rows left (those no earlier run finished) are planned in this process and grouped by the
settings that decide a call's cost (size, frames, steps, decode chunk, videos per row, tries).
A few rows of each group are rendered on one in-process worker (the job's model, dtype and
batch size, or `--simulate`'s simulated device), after one warm-up call that MindSpore spends
compiling. Each group's device seconds per video (its pipeline and image-encoder calls) and
CPU seconds per video (score, encode, upload, which a worker runs beside its device) give the
cores a device needs to never wait for the CPU; a video then takes its device seconds, or its
CPU seconds over the CPUs each device has, whichever is longer, and that times the group's
rows gives the device-hours. Outputs go to a temporary folder: an `s3://` job's upload time is
measured against the local disk, not its bucket.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from svd_batch.engine import simulated
from svd_batch.engine.loader import check_model_dir, fingerprint
from svd_batch.ledger import KeySet, Progress, progress
from svd_batch.manifest import read_rows
from svd_batch.metadata import part_keys
from svd_batch.plan import Planner
from svd_batch.samples import Reading
from svd_batch.schema import JobSpec, RenderParams, WorkItem
from svd_batch.storage import open_storage

MAX_SAMPLES_PER_SETTING = 64  # rows kept per setting as candidates to render


def setting(params: RenderParams) -> str:
    """What decides a call's cost, as a label."""
    label = f"{params.width}x{params.height}x{params.num_frames}, {params.num_inference_steps} steps"
    label += f", decode {params.decode_chunk_size or params.num_frames}"
    if params.num_videos_per_prompt > 1:
        label += f", {params.num_videos_per_prompt} per row"
    if params.quality is not None:
        label += f", up to {params.quality.max_tries} tries"
    return label


@dataclass
class Setting:
    label: str
    videos: int = 0
    candidates: list[WorkItem] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # device seconds per sampled video
    cpu_s: float = 0.0  # CPU seconds of the sampled videos, all stages

    @property
    def seconds_per_video(self) -> float | None:
        return statistics.mean(self.seconds) if self.seconds else None

    @property
    def cpu_s_per_video(self) -> float | None:
        return self.cpu_s / len(self.seconds) if self.seconds else None


def plan_left(spec: JobSpec) -> dict[str, Setting]:
    """The videos no earlier run finished, by setting."""
    path = spec.model.path
    weights = simulated.FINGERPRINT if spec.simulate else fingerprint(path, check_model_dir(path, spec.model.variant))
    planner = Planner(spec, spec.manifest, "estimate", weights)
    meta = open_storage(spec.metadata_uri)
    earlier = progress(meta, spec.made) if part_keys(meta) else Progress(KeySet([]), {}, KeySet([]))
    settings: dict[str, Setting] = {}
    for item in planner.plan(
        read_rows(spec.manifest, spec.passthrough, Reading.for_spec(spec)), earlier, retry_failed=False
    ):
        if isinstance(item, WorkItem):
            label = setting(item.params)
            group = settings.setdefault(label, Setting(label))
            group.videos += 1
            if len(group.candidates) < MAX_SAMPLES_PER_SETTING:
                group.candidates.append(item)
    return settings


def sample(settings: dict[str, Setting], k: int) -> dict[str, list[WorkItem]]:
    """`k` rows, taken across the settings in turn (so every setting gets one while k lasts)."""
    chosen: dict[str, list[WorkItem]] = defaultdict(list)
    groups = list(settings.values())
    for turn in range(max(len(g.candidates) for g in groups) if groups else 0):
        for group in groups:
            if sum(map(len, chosen.values())) >= k:
                return chosen
            if turn < len(group.candidates):
                chosen[group.label].append(group.candidates[turn])
    return chosen


def measure(spec: JobSpec, chosen: dict[str, list[WorkItem]], settings: dict[str, Setting]) -> float:
    """Render the chosen rows on one worker, in calls of the job's batch size; returns what a
    worker takes to start: its model load and first call (MindSpore compiles in it; a simulated
    device has no first call to warm up)."""
    from svd_batch.worker import RowWorker

    with tempfile.TemporaryDirectory(prefix="svd-batch-estimate-") as scratch:
        # Loose files stand in for shards: the same mp4 encode, and an upload of its size.
        stand_in = {"output": scratch, "shards": None, "formats": spec.formats or ["mp4"]}
        worker = RowWorker(spec.model_copy(update=stand_in))
        started = time.monotonic()
        if spec.simulate is None:
            worker.process([next(iter(chosen.values()))[0]])
        warm_up_s = time.monotonic() - started
        for label, items in chosen.items():
            size = spec.workers.batch_size
            cpu_before = sum(worker.cpu.seconds.values())
            for start in range(0, len(items), size):
                for row in worker.process(items[start : start + size]):
                    if row.status != "failed":
                        settings[label].seconds.append(row.device_s or 0.0)
            settings[label].cpu_s = sum(worker.cpu.seconds.values()) - cpu_before
    return worker.load_s + warm_up_s


def estimate(
    spec: JobSpec, devices: int, k: int | None, deadline: dt.datetime | None, cpus_per_device: float
) -> dict[str, Any]:
    """`cpus_per_device`: the CPUs each device has beside it (the cluster's over its devices)."""
    settings = plan_left(spec)
    videos = sum(g.videos for g in settings.values())
    load_s = measure(spec, sample(settings, k or len(settings)), settings) if videos else 0.0
    known = [g for g in settings.values() if g.seconds_per_video is not None]
    # A setting whose sampled rows all failed (or none was sampled) is costed at the others' mean.
    fallback = (
        statistics.mean(g.seconds_per_video for g in known) if known else 0.0,  # type: ignore[misc]
        statistics.mean(g.cpu_s_per_video for g in known) if known else 0.0,  # type: ignore[misc]
    )
    measured = {
        g.label: (g.seconds_per_video, g.cpu_s_per_video) if g.seconds_per_video is not None else fallback
        for g in settings.values()
    }
    # A video takes its device's seconds unless its CPU work, spread over the device's CPUs, is longer.
    per_video = {label: max(device, cpu / max(cpus_per_device, 1e-9)) for label, (device, cpu) in measured.items()}
    total_s = sum(g.videos * per_video[g.label] for g in settings.values())
    wall_s = total_s / devices + load_s if videos else 0.0
    cores = {label: cpu / device if device else 0.0 for label, (device, cpu) in measured.items()}
    result: dict[str, Any] = {
        "job": spec.name,
        "videos": videos,
        "seconds_per_video": total_s / videos if videos else None,
        "device_hours": total_s / 3600,
        "devices": devices,
        "wall_hours": wall_s / 3600,
        "load_s": load_s,
        "cores_per_device": max(cores.values(), default=0.0),  # what the job's dearest setting needs
        "cpus_per_device": cpus_per_device,
        "settings": [
            {
                "setting": g.label,
                "videos": g.videos,
                "sampled": len(g.seconds),
                "seconds_per_video": per_video[g.label],
                "device_s_per_video": measured[g.label][0],
                "cpu_s_per_video": measured[g.label][1],
                "cores_per_device": cores[g.label],
            }
            for g in settings.values()
        ],
        "deadline": deadline.isoformat() if deadline else None,
        "meets_deadline": None,
        "devices_needed": None,
    }
    if deadline is not None:
        until_s = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
        result["meets_deadline"] = wall_s <= until_s
        # Every device loads the model once, and then renders its share.
        result["devices_needed"] = math.ceil(total_s / (until_s - load_s)) if until_s > load_s else None
    return result

"""Before a night starts: how long its job will take, measured on its own model and rows.

The rows left (those no earlier run finished) are planned in this process and grouped by the
settings that decide a call's cost (size, frames, steps, decode chunk, videos per row, tries).
A few rows of each group are rendered on one in-process worker (the job's model, dtype and
batch size), after one warm-up call that MindSpore spends compiling, and each group's seconds
per video (denoise, decode, score, encode, upload: what a device spends on it) times its rows
gives the device-hours. Outputs go to a temporary folder: an `s3://` job's upload time is
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

from svd_batch.engine.loader import check_model_dir, fingerprint
from svd_batch.ledger import KeySet, Progress, progress
from svd_batch.manifest import read_rows
from svd_batch.metadata import part_keys
from svd_batch.metrics import STAGES
from svd_batch.plan import Planner
from svd_batch.schema import JobSpec, RenderParams, ResultRow, WorkItem
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
    seconds: list[float] = field(default_factory=list)  # per sampled video

    @property
    def seconds_per_video(self) -> float | None:
        return statistics.mean(self.seconds) if self.seconds else None


def plan_left(spec: JobSpec) -> dict[str, Setting]:
    """The videos no earlier run finished, by setting."""
    path = spec.model.path
    planner = Planner(spec, spec.manifest, "estimate", fingerprint(path, check_model_dir(path, spec.model.variant)))
    meta = open_storage(spec.metadata_uri)
    earlier = progress(meta, spec.made) if part_keys(meta) else Progress(KeySet([]), {}, KeySet([]))
    settings: dict[str, Setting] = {}
    for item in planner.plan(read_rows(spec.manifest, spec.passthrough), earlier, retry_failed=False):
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


def device_seconds(row: ResultRow) -> float:
    return sum(getattr(row, f"{stage}_s") or 0.0 for stage in STAGES)


def measure(spec: JobSpec, chosen: dict[str, list[WorkItem]], settings: dict[str, Setting]) -> float:
    """Render the chosen rows on one worker, in calls of the job's batch size; returns what a
    worker takes to start: its model load and first call (MindSpore compiles in it)."""
    from svd_batch.worker import RowWorker

    with tempfile.TemporaryDirectory(prefix="svd-batch-estimate-") as scratch:
        # Loose files stand in for shards: the same mp4 encode, and an upload of its size.
        stand_in = {"output": scratch, "shards": None, "formats": spec.formats or ["mp4"]}
        worker = RowWorker(spec.model_copy(update=stand_in))
        started = time.monotonic()
        worker.process([next(iter(chosen.values()))[0]])
        warm_up_s = time.monotonic() - started
        for label, items in chosen.items():
            size = spec.workers.batch_size
            for start in range(0, len(items), size):
                for row in worker.process(items[start : start + size]):
                    if row.status != "failed":
                        settings[label].seconds.append(device_seconds(row))
    return worker.load_s + warm_up_s


def estimate(spec: JobSpec, devices: int, k: int | None, deadline: dt.datetime | None) -> dict[str, Any]:
    settings = plan_left(spec)
    videos = sum(g.videos for g in settings.values())
    load_s = measure(spec, sample(settings, k or len(settings)), settings) if videos else 0.0
    known = [g.seconds_per_video for g in settings.values() if g.seconds_per_video is not None]
    # A setting whose sampled rows all failed (or none was sampled) is costed at the others' mean.
    fallback = statistics.mean(known) if known else 0.0
    per_video = {g.label: fallback if g.seconds_per_video is None else g.seconds_per_video for g in settings.values()}
    total_s = sum(g.videos * per_video[g.label] for g in settings.values())
    wall_s = total_s / devices + load_s if videos else 0.0
    result: dict[str, Any] = {
        "job": spec.name,
        "videos": videos,
        "seconds_per_video": total_s / videos if videos else None,
        "device_hours": total_s / 3600,
        "devices": devices,
        "wall_hours": wall_s / 3600,
        "load_s": load_s,
        "settings": [
            {"setting": g.label, "videos": g.videos, "sampled": len(g.seconds), "seconds_per_video": per_video[g.label]}
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

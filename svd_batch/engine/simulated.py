"""A simulated device: the whole system at the shape and scale it exists for, without one.

It stands in for the pipeline, and only for it: a call of n videos takes n x SECONDS, most of
it asleep (a device computes, its host's CPU waits, so sleeping costs the CPU nothing and 64
of them fit on 2 cores), and hands back frames of each row's real size and frame count. Their content is the
fitted input panned a few pixels a frame under a fixed grain: cheap to make (shifts and one
add, no random draw per pixel), yet real work for the scores and the encoder, which is what a
simulation must leave to measure. Everything else (planning, scores, gates, encode, upload,
shards, metadata, ledger, report) is the real system.

A simulated row can never pass for a real one: its model fingerprint is its own (so are its
keys), its device is `sim`, and a simulated job writes under `<output>/simulated/`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from svd_batch.engine.loader import LoadedModel
from svd_batch.engine.renderer import RenderedVideo, Renderer, VideoRequest

FINGERPRINT = "simulated-device-1"  # the keys of simulated videos: never a real checkpoint's
DEVICE = "sim"
RESOURCE = "sim_device"  # Ray's custom resource: one per simulated device on the local node
NUM_FRAMES = 25  # the model's own clip length, as SVD-XT's
SIZE_MULTIPLE = 8
GRAIN = 6  # levels of the fixed grain over each frame: texture for the flow and the encoder
EMBEDDING_SIDE = 16  # the stand-in image encoder: a thumbnail of this side
# A simulated worker's own memory, its frames aside (Ray, pyarrow, OpenCV, imageio; no
# MindSpore, no weights): 16 full-size workers held 200-211 MiB of proportional set size each
# with up to 42 MiB of frames (2026-12-07). 64 of them then take 15.5 GiB of Ray's 16.3 here.
RUNTIME_BYTES = 160 * 2**20


def model() -> LoadedModel:
    return LoadedModel(
        pipe=None,
        path="simulated",
        sha256=FINGERPRINT,
        device=DEVICE,
        num_frames=NUM_FRAMES,
        size_multiple=SIZE_MULTIPLE,
        dtype="fp32",
    )


def worker_memory(height: int, width: int, num_frames: int, batch_size: int, calls: int) -> int:
    """Host memory of one simulated worker: itself, and the frames of the calls it holds at once."""
    return RUNTIME_BYTES + calls * batch_size * height * width * num_frames * 3


@dataclass
class SimulatedRenderer(Renderer):
    seconds: float = 1.0  # per video: a call of n videos takes n x seconds
    _grain: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def _call(self, group: list[VideoRequest]) -> list[RenderedVideo]:
        """n x seconds in all: the frames are made first, and the rest of the time is slept, as a
        device computes while its host waits (the frames' host work is part of a real call too)."""
        started = time.perf_counter()
        videos = [self._frames(request) for request in group]
        made = time.perf_counter()
        time.sleep(max(0.0, self.seconds * len(group) - (made - started)))
        ended = time.perf_counter()
        n = len(group)
        chunk = group[0].params.decode_chunk_size or group[0].params.num_frames or NUM_FRAMES
        return [RenderedVideo(frames, (ended - made) / n, (made - started) / n, n, chunk) for frames in videos]

    def _frames(self, request: VideoRequest) -> np.ndarray:
        """The input panned by a step the seed draws (1-3 px a frame, either way), under grain."""
        image = np.minimum(np.asarray(request.image, dtype=np.uint8), 255 - GRAIN)  # the grain never wraps
        h, w, _ = image.shape
        grain = self._grain.get((h, w))
        if grain is None:
            grain = self._grain[(h, w)] = np.random.default_rng(0).integers(0, GRAIN, (h, w, 3), dtype=np.uint8)
        rng = np.random.default_rng(request.seed)
        step = int(rng.integers(1, 4)) * (1 if rng.integers(2) else -1)
        count = request.params.num_frames or NUM_FRAMES
        frames = np.empty((count, h, w, 3), dtype=np.uint8)
        for i in range(count):
            np.add(np.roll(image, step * i, axis=1), grain, out=frames[i])
        return frames

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """A stand-in for the image encoder: each image's small thumbnail, as a vector, so the
        consistency score compares the last frame with the input as the real one does."""
        side = (EMBEDDING_SIDE, EMBEDDING_SIDE)
        thumbs = [np.asarray(i.convert("RGB").resize(side, Image.Resampling.BILINEAR), np.float32) for i in images]
        return np.stack(thumbs).reshape(len(images), -1) / 255.0

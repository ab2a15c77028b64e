"""Scores of one clip, from the uint8 frames the worker already holds, before they are encoded.

They are what a team synthesising a training set filters on: SVD's best-known failure is the
near-static clip, then flicker, blur, a first frame that drifts from the input, and a last
frame that no longer shows it. The units are in docs/datasets.md ("Scores and quality gates").
Each is a plain measurement of the frames, so it can be checked on synthetic clips with a known answer, but
consistency, which compares the model's own CLIP image embeddings of input and last frame.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from svd_batch.schema import ClipScores

# Flow is measured with the short side scaled to this, so that motion reads in the same
# pixels at every render size (and on real SVD sizes it stays cheap).
ANALYSIS_SHORT_SIDE = 256
# The unit of each `score_<name>` column, as the report labels its axes.
UNITS = {"motion": "px/frame", "flicker": "levels", "sharpness": "levels²", "fidelity": "dB", "consistency": "cos"}
# PSNR of identical images is infinite; a cap keeps the column finite for statistics and gates.
MAX_PSNR_DB = 100.0


def _gray(frames: np.ndarray) -> list[np.ndarray]:
    """Each frame's luminance (BT.601, as OpenCV weighs it), uint8."""
    import cv2

    return [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]


def motion(frames: np.ndarray) -> float | None:
    """Mean optical-flow magnitude between consecutive frames (OpenCV's DIS flow), in pixels
    per frame of the clip scaled to a short side of ANALYSIS_SHORT_SIDE.

    DIS at its ultrafast preset, not Farneback: on a 256x448 clip of 14 frames it takes 0.05 s
    against Farneback's 0.41 s (its example settings), and reads a 2 px/frame pan as 2.01 where
    Farneback read 1.87. The scores run on the CPU beside the device, so their cost is what a
    device's host must keep up with (docs/devices.md).

    A larger clip is shrunk to that size first; a smaller one is measured at its own size and
    its flow scaled up, as upsampling would leave too little texture for the flow to follow.
    """
    import cv2

    if len(frames) < 2:
        return None
    _, h, w, _ = frames.shape
    gray = _gray(frames)
    scale = ANALYSIS_SHORT_SIDE / min(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in gray]
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    magnitudes = [float(np.linalg.norm(flow.calc(a, b, None), axis=-1).mean()) for a, b in itertools.pairwise(gray)]
    return float(np.mean(magnitudes)) * max(scale, 1.0)


def flicker(frames: np.ndarray) -> float | None:
    """Mean absolute change of a frame's mean luminance from the frame before, in 8-bit levels."""
    if len(frames) < 2:
        return None
    return float(np.abs(np.diff([g.mean() for g in _gray(frames)])).mean())


def sharpness(frames: np.ndarray) -> float:
    """Variance of the Laplacian of each frame's luminance, at the clip's own size, averaged."""
    import cv2

    return float(np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in _gray(frames)]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB, at most MAX_PSNR_DB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10 * math.log10(255.0**2 / mse))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def consistency(
    embed: Callable[[Sequence[Image.Image]], np.ndarray], fitted: Sequence[np.ndarray], frames: Sequence[np.ndarray]
) -> list[float]:
    """Cosine similarity of each input's image embedding with its clip's last frame's. `embed`
    is the pipeline's (Renderer.image_embeddings), called once per clip size (the pipeline
    stacks its images before resizing them, so one call takes one size; a worker's batch can
    hold several): the encoder's per-call cost is most of what scoring costs."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(fitted):
        by_size.setdefault(image.shape, []).append(i)
    scores = [0.0] * len(fitted)
    for clips in by_size.values():
        embeddings = embed([Image.fromarray(f) for f in (*(fitted[i] for i in clips), *(frames[i][-1] for i in clips))])
        for at, i in enumerate(clips):
            scores[i] = cosine(embeddings[at], embeddings[len(clips) + at])
    return scores


def score_clip(frames: np.ndarray, fitted: np.ndarray, consistency: float | None = None) -> ClipScores:
    """`frames` uint8 (frames, height, width, 3); `fitted` the input as the pipeline got it."""
    return ClipScores(
        motion=motion(frames),
        flicker=flicker(frames),
        sharpness=sharpness(frames),
        fidelity=psnr(frames[0], fitted),
        consistency=consistency,
    )

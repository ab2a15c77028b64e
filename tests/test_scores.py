"""The clip scores on synthetic clips whose answer is known, without the model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from svd_batch.scores import MAX_PSNR_DB, consistency, cosine, score_clip


def texture(side: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture: detail at every scale the flow's pyramid looks at."""
    noise = np.random.default_rng(seed).uniform(0, 255, (side, side, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def translated(canvas: np.ndarray, step: int, frames: int, side: int) -> np.ndarray:
    """A side x side window panning across `canvas`, `step` pixels to the right per frame."""
    return np.stack([canvas[:side, i * step : i * step + side] for i in range(frames)])


@pytest.mark.parametrize(("side", "step", "reads"), [(256, 2, 2.0), (512, 4, 2.0), (64, 1, 4.0)])
def test_motion_reads_a_pan_in_pixels_per_frame_at_the_analysis_size(side: int, step: int, reads: float) -> None:
    # The unit is a pixel of the clip with its short side at 256: a 512 px clip panned 4 px a
    # frame moves 2 of them, a 64 px clip panned 1 px moves 4.
    clip = translated(texture(side + 8 * step), step, 8, side)
    assert score_clip(clip, clip[0]).motion == pytest.approx(reads, rel=0.05)


def test_a_static_clip_has_no_motion_and_no_flicker() -> None:
    clip = np.repeat(texture(256)[None], 6, axis=0)
    scores = score_clip(clip, clip[0])
    assert scores.motion == pytest.approx(0.0, abs=0.01)
    assert scores.flicker == 0.0
    assert scores.fidelity == MAX_PSNR_DB


def test_alternating_brightness_flickers() -> None:
    frame = texture(128).astype(np.int16)
    steady = np.repeat(frame[None], 6, axis=0)
    alternating = np.stack([frame + (40 if i % 2 else 0) for i in range(6)])
    flicker = score_clip(np.clip(alternating, 0, 255).astype(np.uint8), frame.astype(np.uint8)).flicker
    assert flicker is not None and flicker > 25
    assert score_clip(steady.astype(np.uint8), frame.astype(np.uint8)).flicker == 0.0


def test_a_blurred_clip_is_less_sharp() -> None:
    clip = np.stack([texture(128, seed) for seed in range(4)])
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 3.0) for f in clip])
    sharp, soft = score_clip(clip, clip[0]).sharpness, score_clip(blurred, clip[0]).sharpness
    assert soft < sharp / 5


def test_fidelity_is_the_first_frames_psnr_against_the_input() -> None:
    fitted = np.full((64, 64, 3), 128, np.uint8)
    noise = np.random.default_rng(0).normal(0, 10, fitted.shape)
    first = np.clip(fitted + noise, 0, 255).round().astype(np.uint8)
    clip = np.stack([first, fitted])  # only the first frame counts
    assert score_clip(clip, fitted).fidelity == pytest.approx(20 * np.log10(255 / 10), abs=0.3)


def test_one_frame_has_no_motion_or_flicker_to_measure() -> None:
    clip = texture(64)[None]
    scores = score_clip(clip, clip[0])
    assert scores.motion is None and scores.flicker is None


def test_cosine() -> None:
    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, 2 * a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.0)


def test_consistency_comes_from_the_pipelines_own_image_encoder(loaded) -> None:  # type: ignore[no-untyped-def]
    from svd_batch.engine.renderer import Renderer

    embed = Renderer(loaded).image_embeddings
    image, other = texture(64, 0), texture(64, 1)
    embeddings = embed([Image.fromarray(image), Image.fromarray(image), Image.fromarray(other)])
    assert embeddings.shape[0] == 3 and np.isfinite(embeddings).all()
    assert cosine(embeddings[0], embeddings[1]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(embeddings[0], embeddings[2]) < cosine(embeddings[0], embeddings[1])
    # The input against its clip's last frame, for many clips in one call: a clip ending on
    # its input scores 1.
    ends_on_input, drifts = np.stack([other, image]), np.stack([image, other])
    same, drifted = consistency(embed, [image, image], [ends_on_input, drifts])
    assert same == pytest.approx(1.0, abs=1e-5) and drifted < 1 - 1e-4
    assert drifted == pytest.approx(cosine(embeddings[0], embeddings[2]), abs=1e-5)
    assert score_clip(ends_on_input, image).consistency is None
    # One worker batch can hold clips of several sizes (a row's own height and width): each
    # is scored as it would be alone.
    small = np.ascontiguousarray(texture(48, 2)[:, :40])
    wide, wide_other = texture(80, 3).reshape(2, 40, 80, 3)  # two 40 x 80 halves of one texture
    clips = [drifts, np.stack([small, small]), np.stack([wide, wide_other])]
    mixed = consistency(embed, [image, small, wide], clips)
    assert mixed[0] == pytest.approx(drifted, abs=1e-5) and mixed[1] == pytest.approx(1.0, abs=1e-5)
    assert mixed[2] == pytest.approx(consistency(embed, [wide], clips[2:])[0], abs=1e-5) and mixed[2] < 1 - 1e-4

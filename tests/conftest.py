"""Shared, session-wide real parts: the tiny model (built once), one loaded worker."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import svd_batch  # noqa: F401  (sets the protobuf implementation before anything imports it)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SVD_BATCH_CACHE", str(ROOT / ".cache"))

# Small enough that one tiny video renders in about a second on one core.
FAST = {"height": 32, "width": 32, "num_frames": 4, "num_inference_steps": 2, "decode_chunk_size": 2}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from svd_batch.cli import cache_dir, ensure_tiny_model

    return ensure_tiny_model(cache_dir() / "tiny-svd")


@pytest.fixture(scope="session")
def loaded(tiny_model: Path):  # type: ignore[no-untyped-def]
    from svd_batch.engine.loader import load_pipeline
    from svd_batch.schema import ModelSpec

    return load_pipeline(ModelSpec(path=tiny_model))


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """A textured test image (flat colours would hide fitting and orientation bugs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy, "RGB").convert(mode).save(path)
    return path

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():  # type: ignore[no-untyped-def]
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), for the whole session.

    Its address and credentials go into the environment before the Ray cluster starts, so
    the workers reach it the way production workers reach theirs: the standard AWS variables.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str):  # type: ignore[no-untyped-def]
    """One local Ray cluster shared by the job tests (started after S3, so workers see it)."""
    import ray

    from svd_batch.driver import WORKER_ENV

    # 2 real cores; 4 logical CPUs leave room for Ray Data's own tasks beside 2 workers.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()

"""Shared, session-wide real parts: the tiny model (built once), one loaded worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import svd_batch  # noqa: F401  (sets the protobuf implementation before anything imports it)
from chaos.proxy import free_port
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SVD_BATCH_CACHE", str(ROOT / ".cache"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from svd_batch.engine.checkpoints import ensure_checkpoint

    return ensure_checkpoint()


@pytest.fixture(scope="session")
def loaded(tiny_model: Path):  # type: ignore[no-untyped-def]
    from svd_batch.engine.loader import load_pipeline
    from svd_batch.schema import ModelSpec

    return load_pipeline(ModelSpec(path=tiny_model))


@pytest.fixture(scope="session")
def s3_server():  # type: ignore[no-untyped-def]
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), for the whole session.

    Its address and credentials go into the environment before the Ray cluster starts, so
    the workers reach it the way production workers reach theirs: the standard AWS variables.
    """
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except OSError:
            return False
        return True

    wait_until(answers, f"the S3 server on {endpoint}", timeout=120)
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

    from svd_batch import WORKER_ENV
    from svd_batch.engine.simulated import RESOURCE

    # 2 real cores; 4 logical CPUs leave room for Ray Data's own tasks beside 2 workers. Simulated
    # devices for the jobs run with `simulate`, as `svd-batch run --simulate` has them locally.
    ray.init(
        address="local",  # never a cluster that `ray start` (or a chaos run) left on this machine
        num_cpus=4,
        resources={RESOURCE: 16},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": WORKER_ENV},
    )
    yield ray
    ray.shutdown()

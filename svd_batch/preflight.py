"""What must hold before a run touches a row, each refused in one line (exit 2): the model a
worker loads (and the host memory it needs), the devices and memory of the cluster, and the
run's record as it starts."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
from pathlib import Path

from svd_batch import WORKER_ENV
from svd_batch.cluster import ClusterError, connect
from svd_batch.engine import simulated
from svd_batch.engine.loader import ModelError, check_model_dir, fingerprint, worker_memory
from svd_batch.errors import JobError
from svd_batch.schema import JobSpec, RunRecord


def worker_needs(spec: JobSpec) -> tuple[int, str]:
    """(host memory each worker needs, the fingerprint output keys carry)."""
    if spec.simulate is not None:
        d = spec.defaults
        frames = d.num_frames or simulated.NUM_FRAMES
        memory = simulated.worker_memory(d.height, d.width, frames, spec.workers.batch_size, spec.workers.calls)
        return memory, simulated.FINGERPRINT
    path = Path(spec.model.path)
    try:
        weights = check_model_dir(path, spec.model.variant)
    except ModelError as exc:
        raise JobError(f"model.path: {exc}") from None
    return worker_memory(weights, spec.model.dtype), fingerprint(path, weights)


def join_cluster(spec: JobSpec, address: str | None, need: int) -> None:
    """Connect to the run's Ray cluster, and check that it has the workers' devices and
    memory (`need`: bytes a worker asks for)."""
    # Submitted through the Jobs API, the job's runtime env already carries WORKER_ENV (see
    # submit.py), and Ray refuses to merge a second one that sets the same variables.
    env = None if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else {"env_vars": WORKER_ENV}
    # A private local cluster declares the simulated devices: one per worker.
    devices = {simulated.RESOURCE: spec.workers.count} if spec.simulate is not None else {}
    try:
        connect(address, local_resources=devices, runtime_env=env, log_to_driver=False)
    except ClusterError as exc:
        raise JobError(str(exc)) from None
    check_devices(spec)
    check_memory(spec, need)


def check_devices(spec: JobSpec) -> None:
    """A simulated job on a cluster without simulated devices would wait for them forever."""
    import ray

    if spec.simulate is None:
        return
    count, have = spec.workers.count, int(ray.cluster_resources().get(simulated.RESOURCE, 0))
    if have < count:
        raise JobError(
            f"--simulate: workers.count is {count} and the cluster has {have} simulated devices (Ray resource "
            f"{simulated.RESOURCE}); drop --address for a private local cluster with one per worker, or start "
            f"the head with --resources '{{\"{simulated.RESOURCE}\": {count}}}'"
        )


def check_memory(spec: JobSpec, need: int) -> None:
    """Refuse at start a pool that cannot fit: never let the OS kill workers mid-job."""
    import ray

    count = spec.workers.count
    nodes = [node["Resources"].get("memory", 0.0) for node in ray.nodes() if node["Alive"]]
    fits = sum(int(memory // need) for memory in nodes)
    if fits < count:
        raise JobError(
            f"workers.count: {count} workers need {_gib(need)} of host memory each (the model's weights twice "
            f"while loading, and the runtime), and the cluster's nodes offer {', '.join(map(_gib, nodes))}: "
            f"{fits} fit. Lower workers.count to {fits}, use a smaller dtype, or add nodes"
        )


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def new_record(spec: JobSpec, run_id: str, weights: str) -> RunRecord:
    """The run's record as it starts: what ran, with what, where."""
    return RunRecord(
        job=spec.name,
        run_id=run_id,
        state="running",
        spec_sha256=hashlib.sha256(spec.model_dump_json().encode()).hexdigest(),
        model_fingerprint=weights,
        versions=_versions(),
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=dt.datetime.now(dt.UTC),
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("svd-batch", "ray", "mindspore", "mindone", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found

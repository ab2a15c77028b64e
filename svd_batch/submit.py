"""Hand a job to a shared Ray cluster through the Ray Jobs API, and follow it there.

The spec (and its manifest, when local) travel in the job's `working_dir`; every other local
path in the spec is made absolute, since it must name the same place on the cluster (a shared
filesystem) — object-storage URIs travel unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from svd_batch import WORKER_ENV
from svd_batch.eta import progress_line
from svd_batch.storage import StorageError, open_storage

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def client(address: str | None):  # type: ignore[no-untyped-def]
    # Ray 2.60 turns token authentication on for new clusters; its client sends the token
    # (RAY_AUTH_TOKEN, or ~/.ray/auth_token) only when told that the cluster uses one, and
    # reads that when ray is first imported: nothing before this imports ray.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_JOBS_ADDRESS") or DEFAULT_ADDRESS)


def package(spec_path: Path, into: Path) -> str:
    """Copy the spec, every path in it made absolute, and a local manifest, into a folder the
    Jobs API uploads: relative paths would resolve against Ray's temporary working dir.
    Returns where the run's metadata goes (its `_status.json` is there)."""
    from svd_batch.driver import written_spec
    from svd_batch.samples import is_webdataset

    spec = written_spec(spec_path)
    update: dict[str, str] = {}
    # Shards are data, not a manifest file: like images, they stay where they are (a shared
    # filesystem), named by their absolute path.
    if not spec.manifest.startswith("s3://") and not is_webdataset(spec.manifest):
        source = Path(spec.manifest)
        shutil.copy2(source, into / source.name)
        # Its rows' relative paths still mean the folder it came from (a shared filesystem).
        update = {"manifest": source.name, "manifest_base": spec.manifest_base or str(source.parent)}
    shipped = spec.model_copy(update=update).model_dump(mode="json", exclude_defaults=True)
    (into / "job.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    return spec.as_run().metadata_uri


# A job's entrypoint runs in a shell with the head's PATH, which need not be the environment
# svd-batch was installed in (a head started as .venv/bin/ray start, the venv not activated).
PROBE = 'command -v svd-batch >/dev/null || { echo "svd-batch is not on the PATH of its jobs ($PATH)"; exit 127; }'
PROBE_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


class HeadError(RuntimeError):
    """The cluster's head cannot run svd-batch: said at submit time, not only in the job's log."""


def submit(spec_path: Path, address: str | None, run_args: list[str], wait_s: float = 120.0) -> str:
    with tempfile.TemporaryDirectory(prefix="svd-batch-submit-") as folder:
        metadata = package(spec_path, Path(folder))
        jobs, delay, deadline = client(address), 1.0, time.monotonic() + wait_s
        while True:
            try:
                check_head(jobs, wait_s)
                break
            except RuntimeError as exc:
                # A head that has just started answers 500 until its job agent is up.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        return _submit(jobs, folder, spec_path, metadata, run_args)


def check_head(jobs, wait_s: float) -> None:  # type: ignore[no-untyped-def]
    """Run the probe as a job of its own (a few seconds) and raise HeadError if it fails."""
    probe = jobs.submit_job(entrypoint=PROBE, metadata={"svd_batch": "probe: can this head run svd-batch?"})
    deadline = time.monotonic() + wait_s
    while (state := str(jobs.get_job_status(probe).value)) not in PROBE_STATES:
        if time.monotonic() > deadline:
            raise HeadError(f"the head did not run a {wait_s:.0f} s check job (job {probe} is {state}); is it busy?")
        time.sleep(0.5)
    if state != "SUCCEEDED":
        said = _probe_said(jobs, probe) or str(jobs.get_job_info(probe).message or f"its check job ended {state}")
        raise HeadError(
            f"the Ray head cannot run svd-batch: {said}. Start the head from the environment svd-batch is "
            "installed in (`source .venv/bin/activate; ray start --head`), or install svd-batch in its image"
        )


def _submit(jobs, folder: str, spec_path: Path, metadata: str, run_args: list[str]) -> str:  # type: ignore[no-untyped-def]
    return jobs.submit_job(
        entrypoint=" ".join(["svd-batch", "run", "job.yaml", *run_args]),
        # `svd-batch stop` makes Ray SIGTERM the driver, which drains; Ray SIGKILLs it after
        # RAY_JOB_STOP_WAIT_TIME_S (default 3 s), too soon for the batches in flight.
        runtime_env={"working_dir": folder, "env_vars": {**WORKER_ENV, "RAY_JOB_STOP_WAIT_TIME_S": "900"}},
        # Where the run writes _status.json, for `svd-batch status` (a URI, never a credential).
        metadata={"svd_batch_spec": spec_path.name, "svd_batch_metadata": metadata},
    )


def _probe_said(jobs, probe: str) -> str | None:  # type: ignore[no-untyped-def]
    """The probe's own line; a job's log can lag its end by a moment."""
    for _ in range(20):
        said = [line for line in jobs.get_job_logs(probe).splitlines() if line.startswith("svd-batch is not on")]
        if said:
            return said[-1]
        time.sleep(0.5)
    return None


def status(job_id: str, address: str | None) -> str:
    return str(client(address).get_job_status(job_id).value)


def progress(job_id: str, address: str | None) -> str | None:
    """The progress line of the run's `_status.json`; None before its first report (or for a
    job svd-batch did not submit)."""
    uri = (client(address).get_job_info(job_id).metadata or {}).get("svd_batch_metadata")
    if not uri:
        return None
    try:
        summary = json.loads(open_storage(uri).get_bytes("_status.json"))
    except (StorageError, ValueError):
        return None
    return progress_line(summary)


def logs(job_id: str, address: str | None) -> str:
    return client(address).get_job_logs(job_id)


def follow(job_id: str, address: str | None, write: Callable[[str], object]) -> None:
    """Stream the job's log to `write` as it is produced, until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def stop(job_id: str, address: str | None) -> bool:
    return bool(client(address).stop_job(job_id))

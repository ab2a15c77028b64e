"""The job: spec -> plan -> render -> ledger, with progress, limits and exit codes.

1. start: check the spec, storage and model, take the output's lease (exit 2 if not)
2. plan (planning.py) and render (render.py): one Ray Data pipeline, in which plan tasks read
   the manifest in pieces against what earlier runs made, and their work items stream into
   one actor per device; the driver holds counts, never rows
3. ledger: commit each returned batch of rows to Parquet as it arrives (metadata.py), account
   for every planned video, write the run's record and status, release the lease (ledger.py)

`Job` composes the parts, each a module of its own: what must hold before the start
(preflight.py), the time limits and signals (limits.py), the count of every planned video
(accounting.py), the status, progress and metrics others read (run_status.py), and the driver's
side of output shards (run_shards.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from svd_batch.accounting import Accounting
from svd_batch.device import run_figures
from svd_batch.errors import EXIT_CANNOT_START, EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, JobError, first_line
from svd_batch.ledger import KeySet, Progress
from svd_batch.limits import Limits
from svd_batch.manifest import ManifestError, read_rows
from svd_batch.metrics import DriverMetrics
from svd_batch.notify import post
from svd_batch.plan import Planner, RowError
from svd_batch.planning import PlanError, invalid_row, items_from_table, plan_again, plan_dataset, prepare
from svd_batch.preflight import join_cluster, worker_needs
from svd_batch.render import Stalled, configure_ray_data, render, start_control
from svd_batch.run_ledger import RunLedger
from svd_batch.run_shards import ShardCommits
from svd_batch.run_status import RunStatus
from svd_batch.samples import Reading
from svd_batch.schema import JobSpec, RunRecord, Status, explain
from svd_batch.storage import StorageError, local_path

log = logging.getLogger(__name__)


def load_spec(path: Path, simulate: float | None = None) -> JobSpec:
    """The job as it runs (`written_spec`'s `as_run`). `simulate`: seconds per video of a
    simulated device (the spec's own `simulate` otherwise)."""
    return written_spec(path, simulate).as_run()


def written_spec(path: Path, simulate: float | None = None) -> JobSpec:
    """The spec as its file says it: safe YAML, strict pydantic, relative paths resolved against
    the spec's own folder; a simulated one not yet moved under <output>/simulated/, so that
    loading it again (a submitted job on its cluster) moves it once."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path}: no such job spec") from None
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise JobError(f"{path}: a job spec is a mapping with name, manifest, output, model, ...")
    if simulate is not None:
        raw["simulate"] = simulate
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        field, reason = explain(exc, JobSpec)[0]
        raise JobError(f"{path}: {field}: {reason}") from None
    base = path.resolve().parent

    def anchor(name: str, uri: str, local_only: bool = False) -> str:
        # file://relative means what the bare relative path means: relative to the spec.
        if uri.startswith("s3://") and not local_only:
            return uri
        try:
            return str(local_path(uri, base))
        except StorageError as exc:
            raise JobError(f"{path}: {name}: {exc}") from None

    # Weights are a local directory (copied to each node, or on a shared filesystem).
    model = spec.model.model_copy(update={"path": Path(anchor("model.path", str(spec.model.path), local_only=True))})
    update: dict[str, Any] = {
        "manifest": anchor("manifest", spec.manifest),
        "output": anchor("output", spec.output),
        "model": model,
    }
    if spec.metadata:
        update["metadata"] = anchor("metadata", spec.metadata)
    if spec.manifest_base:
        update["manifest_base"] = anchor("manifest_base", spec.manifest_base)
    if spec.inputs.allow:
        allow = [anchor("inputs.allow", root) for root in spec.inputs.allow]
        update["inputs"] = spec.inputs.model_copy(update={"allow": allow})
    return spec.model_copy(update=update)


def new_run_id() -> str:
    # Sorts chronologically, so "latest result per key" is the last part file that has it.
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def validate(spec: JobSpec) -> Iterator[RowError]:
    """Every problem in the manifest, without rendering anything."""
    planner = Planner(spec, spec.manifest, "validate", weights="")
    nothing_earlier = Progress(KeySet([]), {}, KeySet([]))
    try:
        for planned in planner.plan(
            read_rows(spec.manifest, spec.passthrough, Reading.for_spec(spec)), nothing_earlier, retry_failed=False
        ):
            if isinstance(planned, RowError):
                yield planned
    except ManifestError as exc:
        raise JobError(str(exc)) from None


class Job:
    def __init__(
        self,
        spec: JobSpec,
        retry_failed: bool = False,
        verify_outputs: bool = False,
        address: str | None = None,
        progress: Callable[[Counter[str], int], None] | None = None,
        deadline: dt.datetime | None = None,  # when to stop taking rows (next_deadline: aware)
        max_duration: float | None = None,  # seconds after the start to stop taking rows
        handle_signals: bool = False,  # SIGTERM / Ctrl-C drain the job (the CLI sets this)
        status_every: float = 2.0,
        left_ok: bool = False,  # a stop at the deadline or duration limit exits as a finished run would
    ) -> None:
        self.spec, self.retry_failed, self.verify_outputs, self.address = spec, retry_failed, verify_outputs, address
        self.handle_signals, self.left_ok = handle_signals, left_ok
        self.run_id = new_run_id()
        self.ledger = RunLedger(spec, self.run_id, on_lost=self.drain)
        self.tally = Accounting(self.ledger.writer)
        self.counts, self.failures = self.tally.counts, self.tally.failures  # the tally's own, read by the CLI
        self.limits = Limits(deadline, max_duration, self.drain)
        self.progress = progress
        self.status = RunStatus(self.ledger, self.tally, self.limits, self._progress, status_every)
        self.stalled: str | None = None  # why the workers stopped making progress, if they did
        self.stopped: str | None = None  # why the job stopped taking rows early, if it did
        # From the model, at start: the bytes each worker asks Ray for; the fingerprint keys name.
        self.worker_memory, self.weights = 0, ""
        self._control: Any = None
        self._shards: ShardCommits | None = None

    @property
    def record(self) -> RunRecord | None:
        return self.ledger.record

    @property
    def unread_shards(self) -> int:
        return self.tally.unread_shards

    def _progress(self, counts: Counter[str], total: int) -> None:
        if self.progress:  # set by the caller, here or later
            self.progress(counts, total)

    def drain(self, reason: str) -> bool:
        """Stop taking rows: batches in flight finish and are committed; the rest are left.
        Returns whether `reason` is the one the run stopped for (the first)."""
        first = self.stopped is None
        if first:
            self.stopped = reason
        if self._control is not None:
            self._control.drain.remote()
        return first

    def exit_code(self) -> int:
        return exit_code(self.counts, self.stopped, left_ok=self.left_ok and self.limits.out_of_time)

    def summary(self, error: str | None = None) -> dict[str, Any]:
        return self.status.summary(error)

    def run(self) -> Counter[str]:
        state, error = "failed", None
        try:
            self.start()
            try:
                self._run()
                state = "stopped" if self.stopped else "finished"
                return self.counts
            finally:
                try:
                    self._finish(state)
                finally:
                    self.ledger.lease.release()
        except Exception as exc:
            error = first_line(exc)
            raise
        finally:
            if self.spec.notify is not None:
                post(self.spec.notify.webhook, self.summary(error))

    def start(self) -> None:
        """Everything that must hold before any row is touched (exit 2 otherwise)."""
        self.ledger.check()
        self.worker_memory, self.weights = worker_needs(self.spec)
        self.ledger.open(self.weights)

    def _run(self) -> None:
        self.limits.arm()
        try:
            join_cluster(self.spec, self.address, self.worker_memory)
            self.tally.metrics = self.status.metrics = DriverMetrics(self.spec.name)
            configure_ray_data(self.spec)
            if self.handle_signals:
                self.limits.catch_signals()
            self._control = start_control(self.run_id, draining=self.stopped is not None)
            if self.spec.shards is not None:
                self._shards = ShardCommits(self._control, self.tally)
            self._render()
        finally:
            self.limits.cancel()

    def _render(self) -> None:
        """Plan and render in one stream; a run stopped before it starts only plans (counting
        what it leaves, committing invalid rows). Then account for every planned video."""
        try:
            pieces, context = prepare(self.spec, self.run_id, self.weights, self.retry_failed, self.verify_outputs)
        except PlanError as exc:
            raise JobError(str(exc)) from None
        planned = plan_dataset(self.spec, pieces, context)
        try:
            if self.stopped:
                for work in planned.iter_batches(batch_size=None, batch_format="pyarrow"):
                    self.tally.commit([invalid_row(i, _now()) for i in items_from_table(work) if i.error is not None])
            else:
                self.status.throughput.add(time.monotonic(), 0)
                for batch in render(self.spec, self.run_id, planned, self.worker_memory):
                    self.tally.commit(batch)
                    self._control.got_back.remote(batch.num_rows)
                    if self._shards is not None:
                        self._shards.take()
                    self.tally.planned(self._control)
                    self.status.report()
                if self._shards is not None:
                    self._shards.last()
                self.status.report()
        except Stalled as exc:
            self.stalled = str(exc)
        again = partial(plan_again, self.spec, self.run_id, self.weights, self.retry_failed, self.verify_outputs)
        try:
            self.tally.close(self._control, bool(self.stopped), self.stalled, again)
        except (StorageError, PlanError) as exc:
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None

    def _finish(self, state: str) -> None:
        """Commit what is buffered, and leave the run's record and status."""
        try:
            self.ledger.close(lambda: self._ending(state))
        finally:
            if self.record is not None:
                self.status.report(force=True)

    def _ending(self, state: str) -> dict[str, Any]:
        return {
            "state": state,
            "exit_code": EXIT_CANNOT_START if state == "failed" else self.exit_code(),
            "counts": dict(self.counts),
            "ended_at": dt.datetime.now(dt.UTC),
            "stopped": self.stopped,
            "stalled": self.stalled,
            **run_figures(self._control),
        }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def exit_code(counts: Counter[str], stopped: str | None = None, left_ok: bool = False) -> int:
    """`left_ok`: the stop is a normal end (a night ran out; the next run takes what is left)."""
    if stopped and not left_ok:
        return EXIT_STOPPED
    return EXIT_FAILED_ROWS if counts.get(Status.failed, 0) else EXIT_OK

"""The job: spec -> plan -> Ray Data over an actor pool -> metadata, with progress and exit codes.

1. load and check the spec, storage and model (exit 2 if the job cannot start)
2. plan: stream the manifest, record bad rows and done rows, queue the rest
3. render: Ray Data streams queued items through one actor per device
4. commit each returned batch of result rows to Parquet as it arrives
5. account for every queued item, write the status file, print the summary
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from pydantic import ValidationError

from svd_batch import WORKER_ENV
from svd_batch.cluster import ClusterError, connect
from svd_batch.engine.loader import ModelError, check_model_dir, worker_memory
from svd_batch.errors import first_line
from svd_batch.manifest import ManifestError, read_rows
from svd_batch.metadata import FLUSH_ROWS, MetadataWriter, resume_index
from svd_batch.plan import Planner, RowError
from svd_batch.schema import JobSpec, ResultRow, Status, explain
from svd_batch.storage import StorageError, local_path, open_storage

EXIT_OK, EXIT_FAILED_ROWS, EXIT_CANNOT_START, EXIT_STOPPED = 0, 1, 2, 3
log = logging.getLogger(__name__)
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class JobError(RuntimeError):
    """The job cannot start; the message is the one line the user sees."""


def load_spec(path: Path) -> JobSpec:
    """Safe YAML, strict pydantic; relative paths resolve against the spec's own folder."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path}: no such job spec") from None
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise JobError(f"{path}: a job spec is a mapping with name, manifest, output, model, ...")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        field, reason = explain(exc, JobSpec)[0]
        raise JobError(f"{path}: {field}: {reason}") from None
    base = path.resolve().parent

    def anchor(uri: str) -> str:
        return uri if "://" in uri else str(local_path(uri, base))

    model = spec.model.model_copy(update={"path": local_path(str(spec.model.path), base)})
    update: dict[str, Any] = {"manifest": anchor(spec.manifest), "output": anchor(spec.output), "model": model}
    if spec.metadata:
        update["metadata"] = anchor(spec.metadata)
    if spec.manifest_base:
        update["manifest_base"] = anchor(spec.manifest_base)
    if spec.inputs.allow:
        allow = [root if root.startswith("s3://") else str(local_path(root, base)) for root in spec.inputs.allow]
        update["inputs"] = spec.inputs.model_copy(update={"allow": allow})
    return spec.model_copy(update=update)


def next_deadline(clock: str, now: dt.datetime | None = None) -> dt.datetime:
    """The next time the local wall clock shows HH:MM (today, or tomorrow if that has passed)."""
    now = now or dt.datetime.now()
    try:
        hour, minute = (int(part) for part in clock.split(":"))
        target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise ValueError(f"deadline {clock!r} is not HH:MM (24-hour local time), e.g. 06:30") from None
    return target if target > now else target + dt.timedelta(days=1)


def parse_duration(text: str) -> float:
    match = DURATION.match(text.strip())
    if not text.strip() or not match:
        raise ValueError(f"duration {text!r} is not like 8h, 90m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v) or "0s"


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def new_run_id() -> str:
    # Sorts chronologically, so "latest result per key" is the last part file that has it.
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _bad_row(spec: JobSpec, run_id: str, error: RowError) -> ResultRow:
    return ResultRow(
        job=spec.name,
        run_id=run_id,
        id=error.row_id or f"(row {error.line})",
        video_index=0,
        key=f"invalid/row-{error.line}",
        status=Status.failed,
        error=str(error),
        image="",
        ended_at=dt.datetime.now(dt.UTC),
    )


@dataclass
class Plan:
    queued: list[Any] = field(default_factory=list)  # ObjectRefs of Arrow tables of work items
    queued_keys: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)


def validate(spec: JobSpec) -> Iterator[RowError]:
    """Every problem in the manifest, without rendering anything."""
    planner = Planner(spec, spec.manifest, "validate")
    try:
        for number, row in read_rows(spec.manifest):
            if isinstance(row, RowError):
                yield row
                continue
            try:
                planner.resolve(row, number)
            except RowError as exc:
                yield exc
    except ManifestError as exc:
        raise JobError(str(exc)) from None


@dataclass
class Job:
    spec: JobSpec
    retry_failed: bool = False
    address: str | None = None
    run_id: str = field(default_factory=new_run_id)
    progress: Any = None  # callable(counts: Counter, total: int) for live progress
    deadline: dt.datetime | None = None  # local wall-clock time to stop taking rows
    max_duration: float | None = None  # seconds after the start to stop taking rows
    handle_signals: bool = False  # SIGTERM / Ctrl-C drain the job (the CLI sets this)
    status_every: float = 2.0
    stalled: str | None = None  # why the workers stopped making progress, if they did
    stopped: str | None = None  # why the job stopped taking rows early, if it did
    _control: Any = None
    _started: float = field(default_factory=time.monotonic)
    _last_status: float = 0.0

    def _report(self, plan: Plan, total: int, state: str, force: bool = False) -> None:
        if self.progress:
            self.progress(plan.counts, total)
        now = time.monotonic()
        if force or now - self._last_status >= self.status_every:
            self._last_status = now
            document = {
                "job": self.spec.name,
                "run_id": self.run_id,
                "state": state,
                "total": total,
                "counts": dict(plan.counts),
                "elapsed_s": round(now - self._started, 1),
                "output": self.spec.output,
                "metadata": self.spec.metadata_uri,
                "updated_at": dt.datetime.now(dt.UTC).isoformat(),
            }
            try:
                # Beside the part files; the leading underscore keeps dataset readers off it.
                self.meta.put_bytes(json.dumps(document, indent=2).encode(), "_status.json")
            except StorageError as exc:  # a progress note: never worth stopping the job for
                log.warning("status not written: %s", exc)

    def drain(self, reason: str) -> None:
        """Stop taking rows: batches in flight finish and are committed; the rest are left."""
        if self.stopped is None:
            self.stopped = reason
        if self._control is not None:
            self._control.drain.remote()

    def _arm_timers(self) -> list[threading.Timer]:
        limits = []
        if self.deadline is not None:
            seconds = (self.deadline - dt.datetime.now()).total_seconds()
            limits.append((seconds, f"stopped at deadline {self.deadline:%H:%M}"))
        if self.max_duration is not None:
            limits.append((self.max_duration, f"stopped at the {_format_duration(self.max_duration)} limit"))
        timers = [threading.Timer(max(seconds, 0.0), self.drain, args=(reason,)) for seconds, reason in limits]
        for timer in timers:
            timer.daemon = True
            timer.start()
        return timers

    def _on_signal(self, signum: int, frame: object) -> None:
        self.drain(f"stopped by {signal.Signals(signum).name}")
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the driver at once

    def start(self) -> None:
        """Everything that must hold before any row is touched (exit 2 otherwise)."""
        self.output = open_storage(self.spec.output)
        self.meta = open_storage(self.spec.metadata_uri)
        try:
            self.output.check()
            self.meta.check()
        except StorageError as exc:
            raise JobError(str(exc)) from None
        try:
            weights = check_model_dir(Path(self.spec.model.path), self.spec.model.variant)
        except ModelError as exc:
            raise JobError(f"model.path: {exc}") from None
        self.worker_memory = worker_memory(weights, self.spec.model.dtype)
        self.index = resume_index(self.meta)
        self.writer = MetadataWriter(self.meta, self.run_id)

    def _check_memory(self) -> None:
        """Refuse at start a pool that cannot fit: never let the OS kill workers mid-job."""
        import ray

        count, need = self.spec.workers.count, self.worker_memory
        nodes = [node["Resources"].get("memory", 0.0) for node in ray.nodes() if node["Alive"]]
        fits = sum(int(memory // need) for memory in nodes)
        if fits < count:
            raise JobError(
                f"workers.count: {count} workers need {_gib(need)} of host memory each (the model's weights twice "
                f"while loading, and the runtime), and the cluster's nodes offer {', '.join(map(_gib, nodes))}: "
                f"{fits} fit. Lower workers.count to {fits}, use a smaller dtype, or add nodes"
            )

    def plan(self) -> Plan:
        import ray

        plan, chunk, skipped = Plan(), [], []
        now = dt.datetime.now(dt.UTC)
        planner = Planner(self.spec, self.spec.manifest, self.run_id)
        done, failed = self.index.done, self.index.failed
        try:
            for number, row in read_rows(self.spec.manifest):
                try:
                    if isinstance(row, RowError):
                        raise row
                    items = planner.resolve(row, number)
                except RowError as exc:
                    skipped.append(_bad_row(self.spec, self.run_id, exc))
                    continue
                for item in items:
                    if item.key in done or (item.key in failed and not self.retry_failed):
                        reason = None if item.key in done else "failed earlier; rerun with --retry-failed"
                        skipped.append(item.record(Status.skipped, reason, now))
                        if len(skipped) >= FLUSH_ROWS:
                            self._record(skipped, plan)
                            skipped = []
                        continue
                    chunk.append(item.work_item().model_dump_json())
                    plan.queued_keys.add(item.key)
                    # One object per pipeline call: Ray Data gives a whole block to one actor,
                    # so blocks of one batch let the pool share the work evenly.
                    if len(chunk) == self.spec.workers.batch_size:
                        plan.queued.append(ray.put(pa.table({"item": chunk})))
                        chunk = []
        except (StorageError, ManifestError) as exc:
            raise JobError(str(exc)) from None
        self._record(skipped, plan)
        if chunk:
            plan.queued.append(ray.put(pa.table({"item": chunk})))
        return plan

    def _record(self, rows: list[ResultRow | dict[str, Any]], plan: Plan) -> None:
        self.writer.add(rows)
        plan.counts.update(r["status"] if isinstance(r, dict) else r.status for r in rows)

    def render(self, plan: Plan, total: int) -> None:
        import ray
        from ray.data.exceptions import ExecutionTimeoutError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from svd_batch.control import JobControl
        from svd_batch.worker import worker_class

        workers = self.spec.workers
        resources = {**workers.resources, **({"NPU": 1} if workers.device == "npu" else {})}
        # On the driver's own node: a control actor on another node would die with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        control = ray.remote(num_cpus=0)(JobControl)
        self._control = control.options(name=JobControl.name(self.run_id), scheduling_strategy=here).remote()
        if self.stopped:
            self._control.drain.remote()
        ds = ray.data.from_arrow_refs(plan.queued).map_batches(
            worker_class(self.spec.model_dump_json()),
            batch_size=workers.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers.count),
            num_cpus=workers.cpus_per_worker,
            # What the loaded model holds: Ray places no worker where it would not fit.
            memory=self.worker_memory,
            resources=resources or None,
            # Ray Data restarts a worker that dies and retries its batch on it (a restart reloads
            # the model), without bound: the bound is per row, kept by the run's JobControl, so
            # a row that kills its worker every time fails alone after workers.max_attempts.
        )
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                self.writer.add(batch)
                plan.counts.update(batch.column("status").to_pylist())
                plan.queued_keys.difference_update(batch.column("key").to_pylist())
                self._report(plan, total, "running")
        except ExecutionTimeoutError:
            wanted = {"CPU": workers.cpus_per_worker, **(resources or {})}
            self.stalled = (
                f"no worker made progress for {workers.no_progress_timeout_s:.0f} s; check that the cluster "
                f"has {workers.count} x {wanted} free (`ray status`)"
            )

    def run(self) -> Counter[str]:
        import ray

        self.start()
        timers = self._arm_timers()
        # Submitted through the Jobs API, the job's runtime env already carries WORKER_ENV (see
        # submit.py), and Ray refuses to merge a second one that sets the same variables.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        try:
            connect(self.address, runtime_env=None if submitted else {"env_vars": WORKER_ENV}, log_to_driver=False)
        except ClusterError as exc:
            raise JobError(str(exc)) from None
        self._check_memory()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.execution_no_progress_timeout_s = self.spec.workers.no_progress_timeout_s
        # A worker whose node dies mid-batch fails its task with ActorUnavailableError: retry it
        # on the restarted worker. A batch that still fails is
        # skipped, not fatal: its rows are accounted as failed and the other rows go on.
        context.actor_task_retry_on_errors = [ray.exceptions.ActorUnavailableError]
        context.max_errored_blocks = -1
        if self.handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
        plan = self.plan()
        total = sum(plan.counts.values()) + len(plan.queued_keys)
        state = "failed"
        try:
            if plan.queued and not self.stopped:
                self.render(plan, total)
            state = "stopped" if self.stopped else "finished"
        finally:
            for timer in timers:
                timer.cancel()
            self._account(plan)
            try:
                self.writer.close()
            except StorageError as exc:
                raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None
            self._report(plan, total, state, force=True)
        return plan.counts

    def _account(self, plan: Plan) -> None:
        """Rows queued but never returned end as failed rows (workers kept dying on them),
        or, when the job was stopped early, are left for the next run to render."""
        if not plan.queued_keys:
            return
        if self.stopped:
            plan.counts["left"] += len(plan.queued_keys)
            return
        lost = [
            ResultRow(
                job=self.spec.name,
                run_id=self.run_id,
                id=key,
                video_index=0,
                key=key,
                status=Status.failed,
                error=f"key {key}: " + (self.stalled or "no worker returned it") + "; the next run renders it again",
                retryable=True,
                image="",
                ended_at=dt.datetime.now(dt.UTC),
            )
            for key in sorted(plan.queued_keys)
        ]
        self._record(lost, plan)


def exit_code(counts: Counter[str], stopped: str | None = None) -> int:
    if stopped:
        return EXIT_STOPPED
    return EXIT_FAILED_ROWS if counts.get(Status.failed, 0) else EXIT_OK

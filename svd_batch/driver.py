"""The job: spec -> plan -> render -> ledger, with progress, limits and exit codes.

1. start: check the spec, storage and model, take the output's lease (exit 2 if not)
2. plan (planning.py) and render (render.py): one Ray Data pipeline, in which plan tasks read
   the manifest in pieces against what earlier runs made, and their work items stream into
   one actor per device; the driver holds counts, never rows
3. ledger: commit each returned batch of rows to Parquet as it arrives (metadata.py), account
   for every planned video, write the run's record and status, release the lease (ledger.py)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import ValidationError

from svd_batch import WORKER_ENV
from svd_batch.cluster import ClusterError, connect
from svd_batch.engine import simulated
from svd_batch.engine.loader import ModelError, check_model_dir, fingerprint, worker_memory
from svd_batch.errors import first_line
from svd_batch.eta import Throughput
from svd_batch.ledger import KeySet, Lease, LeaseHeld, Progress, close_lost, repair, write_record
from svd_batch.manifest import ManifestError, read_rows
from svd_batch.metadata import MetadataWriter, rows_to_table
from svd_batch.metrics import DriverMetrics
from svd_batch.notify import post
from svd_batch.plan import Planner, RowError
from svd_batch.planning import PlanError, invalid_row, items_from_table, plan_dataset, prepare
from svd_batch.render import Stalled, configure_ray_data, render, start_control
from svd_batch.samples import Reading
from svd_batch.schema import JobSpec, ResultRow, RunRecord, Stage, Status, explain
from svd_batch.shards import reconcile
from svd_batch.storage import StorageError, local_path, open_storage

EXIT_OK, EXIT_FAILED_ROWS, EXIT_CANNOT_START, EXIT_STOPPED = 0, 1, 2, 3
log = logging.getLogger(__name__)
# How long the driver waits, after the stream, for the workers to commit their last shards.
LAST_SHARD_TIMEOUT_S = 300.0
CPU_STAGES = ("score", "encode", "upload")  # a made video's CPU work beside its device (device.py)
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class JobError(RuntimeError):
    """The job cannot start; the message is the one line the user sees."""


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


def next_deadline(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """When to stop taking rows, as an aware time in the zone it was given in.

    `HH:MM` is the next time the wall clock shows it: in the driver's local time zone, or in
    `HH:MM@Area/City`'s zone; an ISO time must carry its UTC offset. Days are counted on the
    wall clock and only then turned into an instant, so a night that crosses a DST change
    still ends at 06:30 on the clock (its timer then runs on the monotonic clock: no drift).
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    clock, at, zone_name = text.strip().partition("@")
    if not at and "T" in clock:
        return _iso_deadline(text, now)
    try:
        hour, minute = (int(part) for part in clock.split(":"))
        wall = dt.time(hour, minute)
    except ValueError:
        raise ValueError(
            f"deadline {text!r} is not HH:MM, HH:MM@Area/City or an ISO time with its offset; "
            "e.g. 06:30, 06:30@Europe/Berlin or 2026-12-04T06:30+01:00"
        ) from None
    if at:
        try:
            zone: dt.tzinfo | None = zoneinfo.ZoneInfo(zone_name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"deadline {text!r}: unknown time zone {zone_name!r}; use an IANA name such as Europe/Berlin"
            ) from None
        today = now.astimezone(zone).date()
    else:
        zone, today = None, now.astimezone().date()  # None: the system's local rules, DST included
    for day in (today, today + dt.timedelta(days=1)):
        naive = dt.datetime.combine(day, wall)
        target = naive.replace(tzinfo=zone) if zone else naive.astimezone()
        if target > now:
            return target
    raise AssertionError("unreachable: tomorrow's wall time is after now")


def _iso_deadline(text: str, now: dt.datetime) -> dt.datetime:
    try:
        target = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"deadline {text!r} is not an ISO time, e.g. 2026-12-04T06:30+01:00") from None
    if target.tzinfo is None:
        raise ValueError(f"deadline {text!r} has no UTC offset; add one (e.g. +01:00 or Z), or use HH:MM@Area/City")
    if target <= now:
        raise ValueError(f"deadline {text!r} has passed; give a time to come")
    return target


def deadline_label(deadline: dt.datetime) -> str:
    """A deadline as its zone shows it, and in UTC (what a log on another machine compares)."""
    zone = getattr(deadline.tzinfo, "key", None) or deadline.tzname()
    return f"{deadline:%Y-%m-%d %H:%M} {zone} ({deadline.astimezone(dt.UTC):%H:%M} UTC)"


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("svd-batch", "ray", "mindspore", "mindone", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


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
        self.progress, self.deadline, self.max_duration = progress, deadline, max_duration
        self.handle_signals, self.status_every, self.left_ok = handle_signals, status_every, left_ok
        self.run_id = new_run_id()
        self.output = open_storage(spec.output)
        self.meta = open_storage(spec.metadata_uri)
        self.runs = open_storage(spec.runs_uri)
        self.writer = MetadataWriter(self.meta, self.run_id, flush_seconds=spec.commit_every_s)
        self.lease = Lease(self.meta, self.run_id, spec.lease_ttl_s, on_lost=self.drain)
        self.counts: Counter[str] = Counter()
        # Failed rows of this run by (error_stage, error_type, retryable), for the summary.
        self.failures: Counter[tuple[str, str, bool]] = Counter()
        self.total = 0  # videos planned so far (planning reports them as it goes)
        self.stalled: str | None = None  # why the workers stopped making progress, if they did
        self.stopped: str | None = None  # why the job stopped taking rows early, if it did
        self.out_of_time = False  # stopped by its deadline or duration limit (not a signal or a lost lease)
        self.throughput = Throughput()  # videos this run made, over the last minutes
        self.lost_in_shards = 0  # rows lost with a worker's open shard (they were made, but never committed)
        self.unread_shards = 0  # WebDataset shards a stopping run left unread, so uncounted
        self._limit: tuple[float, str] | None = None  # the earliest time limit: (monotonic time, its name)
        self.record: RunRecord | None = None
        self.worker_memory = 0  # bytes each worker asks Ray for, from the weights (start)
        self.weights = ""  # the model's fingerprint, which keys name (start)
        self._control: Any = None
        self.metrics: DriverMetrics | None = None  # once connected to Ray
        self._started = time.monotonic()
        self._last_status = 0.0

    def drain(self, reason: str) -> None:
        """Stop taking rows: batches in flight finish and are committed; the rest are left."""
        if self.stopped is None:
            self.stopped = reason
        if self._control is not None:
            self._control.drain.remote()

    def exit_code(self) -> int:
        return exit_code(self.counts, self.stopped, left_ok=self.left_ok and self.out_of_time)

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
                    self.lease.release()
        except Exception as exc:
            error = first_line(exc)
            raise
        finally:
            if self.spec.notify is not None:
                post(self.spec.notify.webhook, self.summary(error))

    def summary(self, error: str | None = None) -> dict[str, Any]:
        """The run as the webhook and `_status.json` show it: its record, what it left, and its
        failures by class (retryable ones come back on a plain rerun). `error`: why it broke off."""
        record = self.record.model_dump(mode="json") if self.record else {"job": self.spec.name, "run_id": self.run_id}
        if error is not None:  # it could not start (no record, or one still "running"), or broke off
            record.update(state="failed", exit_code=EXIT_CANNOT_START)
        failures = [
            {"stage": stage, "type": kind, "retryable": retryable, "rows": n}
            for (stage, kind, retryable), n in self.failures.most_common()
        ]
        remaining = max(self.total - sum(self.counts.values()), 0)
        limit_in_s = self._limit[0] - time.monotonic() if self._limit else None
        return {
            **record,
            "counts": dict(self.counts),
            "total": self.total,
            "remaining": remaining,  # planned, not ended yet
            **self.throughput.forecast(remaining, limit_in_s),
            "limit": self._limit[1] if self._limit else None,
            "error": error,
            "failures": failures,
            "output": self.spec.output,
            "metadata": self.spec.metadata_uri,
        }

    def start(self) -> None:
        """Everything that must hold before any row is touched (exit 2 otherwise)."""
        try:
            self.output.check()
            self.meta.check()
        except StorageError as exc:
            raise JobError(str(exc)) from None
        self.worker_memory, self.weights = self._model()
        try:
            taken_over = self.lease.acquire()
        except (LeaseHeld, StorageError) as exc:
            raise JobError(f"output {self.spec.output}: {exc}") from None
        if taken_over:
            log.warning("%s", taken_over)
        self.record = RunRecord(
            job=self.spec.name,
            run_id=self.run_id,
            state="running",
            spec_sha256=hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest(),
            model_fingerprint=self.weights,
            versions=_versions(),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=dt.datetime.now(dt.UTC),
        )
        try:
            repair(self.meta)
            if self.spec.shards is not None:
                self._reconcile_shards()
            write_record(self.runs, self.record)
            if self.lease.taken_from is not None:
                close_lost(self.runs, self.lease.taken_from)
        except StorageError as exc:
            self.lease.release()
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None

    def _model(self) -> tuple[int, str]:
        """(host memory each worker needs, the fingerprint output keys carry)."""
        spec = self.spec
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

    def _run(self) -> None:
        timers = self._arm_timers()
        # Submitted through the Jobs API, the job's runtime env already carries WORKER_ENV (see
        # submit.py), and Ray refuses to merge a second one that sets the same variables.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        try:
            try:
                connect(
                    self.address,
                    local_resources=self._devices(),
                    runtime_env=None if submitted else {"env_vars": WORKER_ENV},
                    log_to_driver=False,
                )
            except ClusterError as exc:
                raise JobError(str(exc)) from None
            self._check_devices()
            self._check_memory()
            self.metrics = DriverMetrics(self.spec.name)
            configure_ray_data(self.spec)
            if self.handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, self._on_signal)
            self._control = start_control(self.run_id, draining=self.stopped is not None)
            self._render()
        finally:
            for timer in timers:
                timer.cancel()

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
                    self._commit([invalid_row(i, _now()) for i in items_from_table(work) if i.error is not None])
            else:
                self.throughput.add(time.monotonic(), 0)
                for batch in render(self.spec, self.run_id, planned, self.worker_memory):
                    self._commit(batch)
                    self._control.got_back.remote(batch.num_rows)
                    self._take_shards()
                    self._plan_counts()
                    self._report()
                self._last_shards()
        except Stalled as exc:
            self.stalled = str(exc)
        self._account()

    def _take_shards(self) -> int:
        """Commit the rows of the shards workers committed; returns the rows in open shards."""
        import ray

        if self.spec.shards is None:
            return 0
        rows, holding, self.lost_in_shards = ray.get(self._control.take_committed.remote())
        if rows:
            self._commit(rows_to_table(rows))
        return holding

    def _last_shards(self) -> None:
        """Ray Data ends the workers after the stream, and each commits its last shard then."""
        give_up = time.monotonic() + LAST_SHARD_TIMEOUT_S
        while self._take_shards() and time.monotonic() < give_up:
            time.sleep(0.2)
        self._report()

    def _plan_counts(self) -> Counter[str]:
        import ray

        planned = Counter(ray.get(self._control.plan_counts.remote()))
        self.total, self.unread_shards = planned["videos"], planned["unread_shards"]
        if planned["skipped"]:
            self.counts["skipped"] = planned["skipped"]
        return planned

    def _account(self) -> None:
        """Every planned video ends made, failed, skipped or left. Those no worker returned
        (stalled, or lost with a batch Ray Data gave up on) are planned once more, against the
        ledger with this run's own rows counted as done, and written failed and retryable."""
        planned = self._plan_counts()
        unreturned = self.total - sum(self.counts.values()) - planned["left"]
        if self.stopped:
            if planned["left"] + unreturned:
                self.counts["left"] += planned["left"] + unreturned
            return
        if not unreturned and not self.stalled:
            return
        reason = self.stalled or "no worker returned it" + (
            f" ({self.lost_in_shards} rows were in the open shards of workers that died)" if self.lost_in_shards else ""
        )
        stage, kind = Stage.worker, "Stalled" if self.stalled else "Lost"
        try:
            self.writer.flush(must=True)
            pieces, context = prepare(
                self.spec, self.run_id, self.weights, self.retry_failed, self.verify_outputs, exclude_run=self.run_id
            )
        except (StorageError, PlanError) as exc:
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None
        for work in plan_dataset(self.spec, pieces, context).iter_batches(batch_size=None, batch_format="pyarrow"):
            self._commit(
                [
                    invalid_row(item, _now())
                    if item.error is not None
                    else ResultRow.for_item(
                        item,
                        Status.failed,
                        error=f"row {item.line} (id {item.id!r}): {stage}: {reason}; the next run renders it again",
                        error_stage=stage,
                        error_type=kind,
                        retryable=True,
                        ended_at=_now(),
                    )
                    for item in items_from_table(work)
                ]
            )

    def _commit(self, rows: pa.Table | list[ResultRow]) -> None:
        """Hand rows to the metadata writer, and count them and their failure classes."""
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        self.writer.add(table)
        statuses = Counter(table.column("status").to_pylist())
        self.counts.update(statuses)
        if self.metrics is not None:
            self.metrics.ended(statuses)
        failed = table.filter(pc.equal(table.column("status"), Status.failed.value))
        columns = (failed.column(c).to_pylist() for c in ("error_stage", "error_type", "retryable"))
        self.failures.update((s, t, bool(r)) for s, t, r in zip(*columns, strict=True))

    def _finish(self, state: str) -> None:
        """Commit what is buffered, and leave the run's record and status."""
        if self.record is None:
            return
        try:
            self.writer.close()
            if self.spec.shards is not None:
                self._reconcile_shards()
        except StorageError as exc:
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None
        finally:
            self.record = self.record.model_copy(
                update={
                    "state": state,
                    "exit_code": EXIT_CANNOT_START if state == "failed" else self.exit_code(),
                    "counts": dict(self.counts),
                    "ended_at": dt.datetime.now(dt.UTC),
                    "stopped": self.stopped,
                    "stalled": self.stalled,
                    **self._device_figures(),
                }
            )
            try:
                write_record(self.runs, self.record)
            except StorageError as exc:
                log.warning("run record not written: %s", exc)
            self._report(force=True)

    def _device_figures(self) -> dict[str, Any]:
        """The run record's device_busy, frames_peak_mb and cpu_s_per_video (none before Ray)."""
        if self._control is None:
            return {}
        import ray

        try:
            figures: list[dict[str, float]] = ray.get(self._control.device_figures.remote())
        except ray.exceptions.RayError as exc:  # the record is still worth writing without them
            log.warning("device figures not read: %s", first_line(exc))
            return {}
        if not figures:
            return {}
        videos = sum(f["videos"] for f in figures)
        cpu = {stage: sum(f.get(f"cpu_{stage}_s", 0.0) for f in figures) for stage in CPU_STAGES}
        return {
            "device_busy": round(sum(f["busy"] for f in figures) / len(figures), 4),
            "frames_peak_mb": round(max(f["frames_peak_bytes"] for f in figures) / 2**20, 1),
            "cpu_s_per_video": {stage: round(seconds / videos, 4) for stage, seconds in cpu.items()} if videos else {},
        }

    def _reconcile_shards(self) -> None:
        deleted = reconcile(self.output, self.meta)
        if deleted:
            log.warning("deleted %d shard(s) that no metadata row names (a run died before its rows)", deleted)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        self.throughput.add(now, sum(self.counts[status.value] for status in Status))  # made by this run
        if self.progress:
            self.progress(self.counts, self.total)
        if force or now - self._last_status >= self.status_every:
            self._last_status = now
            summary = self.summary()
            if self.metrics is not None:
                self.metrics.progress(summary["remaining"], summary["eta_s"])
            document = {
                **summary,
                "elapsed_s": round(now - self._started, 1),
                "updated_at": dt.datetime.now(dt.UTC).isoformat(),
            }
            try:
                # Beside the part files; the leading underscore keeps dataset readers off it.
                self.meta.put_bytes(json.dumps(document, indent=2).encode(), "_status.json")
            except StorageError as exc:  # a progress note: never worth stopping the job for
                log.warning("status not written: %s", exc)

    def _arm_timers(self) -> list[threading.Timer]:
        limits = []  # (seconds from now, why the run stops then, what the forecast calls it)
        if self.deadline is not None:
            # Both in UTC: Python subtracts two times of one zone on the wall clock, DST and all.
            seconds = (self.deadline.astimezone(dt.UTC) - dt.datetime.now(dt.UTC)).total_seconds()
            reason = f"stopped at deadline {deadline_label(self.deadline)}"
            limits.append((seconds, reason, f"{self.deadline:%H:%M %Z}"))
        if self.max_duration is not None:
            limit = f"the {_format_duration(self.max_duration)} limit"
            limits.append((self.max_duration, f"stopped at {limit}", limit))
        if limits:
            seconds, _, name = min(limits)
            self._limit = (time.monotonic() + seconds, name)
        timers = []
        for seconds, reason, _ in limits:
            if seconds <= 0:  # already due: no row is taken (a timer thread might start late)
                self._time_up(reason)
                continue
            timer = threading.Timer(seconds, self._time_up, args=(reason,))
            timer.daemon = True
            timer.start()
            timers.append(timer)
        return timers

    def _time_up(self, reason: str) -> None:
        if self.stopped is None:
            self.out_of_time = True
        self.drain(reason)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.drain(f"stopped by {signal.Signals(signum).name}")
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the driver at once

    def _devices(self) -> dict[str, float]:
        """The simulated devices a private local cluster declares: one per worker."""
        return {simulated.RESOURCE: self.spec.workers.count} if self.spec.simulate is not None else {}

    def _check_devices(self) -> None:
        """A simulated job on a cluster without simulated devices would wait for them forever."""
        import ray

        if self.spec.simulate is None:
            return
        count, have = self.spec.workers.count, int(ray.cluster_resources().get(simulated.RESOURCE, 0))
        if have < count:
            raise JobError(
                f"--simulate: workers.count is {count} and the cluster has {have} simulated devices (Ray resource "
                f"{simulated.RESOURCE}); drop --address for a private local cluster with one per worker, or start "
                f"the head with --resources '{{\"{simulated.RESOURCE}\": {count}}}'"
            )

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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def exit_code(counts: Counter[str], stopped: str | None = None, left_ok: bool = False) -> int:
    """`left_ok`: the stop is a normal end (a night ran out; the next run takes what is left)."""
    if stopped and not left_ok:
        return EXIT_STOPPED
    return EXIT_FAILED_ROWS if counts.get(Status.failed, 0) else EXIT_OK

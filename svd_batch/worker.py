"""The worker: owns one device, loads the pipeline once, turns work items into result rows.

Frames and videos never leave the worker: they are encoded and uploaded here, and only the
small metadata rows go back to the driver. `RowWorker` is plain Python (the `render` command
runs it in-process); `RayWorker` is the Ray Data callable wrapped around it.

The device's path holds only device work. A call renders its batch and runs the image
encoder for its consistency scores back to back while it holds the device; then it lets the
device go and scores, encodes, uploads and fills the shard on the CPU. `RayWorker` runs
`workers.calls` (2) of them at once, so the next batch renders while the last one is
written: the device waits for the CPU only where a batch's CPU work outlasts a batch's
render, and then backpressure holds it (no further batch is taken), so at most `calls`
batches of frames are held.
"""

from __future__ import annotations

import io
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from svd_batch.control import History, JobControl
from svd_batch.device import CpuClock, FrameMeter
from svd_batch.device_calls import DeviceCalls
from svd_batch.engine import simulated
from svd_batch.engine.loader import LoadedModel, load_pipeline
from svd_batch.engine.renderer import Renderer, VideoRequest
from svd_batch.images import load_image
from svd_batch.inputs import InputPolicy
from svd_batch.isolation import refusal, watchdog
from svd_batch.judging import Judge
from svd_batch.metadata import rows_to_table
from svd_batch.metrics import WorkerMetrics
from svd_batch.planning import invalid_row, items_from_table
from svd_batch.preparing import Prepared, fail, now
from svd_batch.schema import JobSpec, ResultRow, Stage, Status, WorkItem
from svd_batch.storage import open_storage
from svd_batch.writing import Writing


def _engine(spec: JobSpec) -> tuple[LoadedModel, Renderer]:
    """The loaded pipeline and its renderer; under `simulate`, the simulated device's (which
    imports no MindSpore and loads no weights)."""
    if spec.simulate is not None:
        model = simulated.model()
        return model, simulated.SimulatedRenderer(model, max_batch=spec.workers.batch_size, seconds=spec.simulate)
    model = load_pipeline(spec.model, spec.workers.device)
    return model, Renderer(model, max_batch=spec.workers.batch_size)


class RowWorker:
    """Its `process` may run in several threads at once: the device is one at a time, and so
    is the open shard. A call's four steps: prepare each row (preparing.py), render them on
    the device (device_calls.py), judge each video (judging.py), which writes it (writing.py)."""

    def __init__(self, spec: JobSpec) -> None:
        started = time.perf_counter()
        self.spec = spec
        # One thread per clip's scores: the device no longer waits for them, so what counts
        # is CPU seconds per clip, which OpenCV's own threads only add to on a busy host.
        cv2.setNumThreads(1)
        self.model, self.renderer = _engine(spec)
        self.device = DeviceCalls(self.model, self.renderer)
        self.cpu = CpuClock()
        self.frames = FrameMeter()
        self.writing = Writing(spec, open_storage(spec.output), self.cpu)
        self.judge = Judge(self.cpu, self.writing)
        self.inputs = InputPolicy.for_spec(spec)
        self.node = socket.gethostname()
        self.worker_id = f"pid-{os.getpid()}"
        self.load_s = time.perf_counter() - started
        self.load_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        self._loads_reported = False
        self._lock = threading.Lock()  # the load report goes to one row of one call

    def process(
        self, items: Sequence[WorkItem], attempt: int = 1, on_device: Callable[[], None] | None = None
    ) -> list[ResultRow]:
        """One result row per item, in order; a bad item never costs another its video.
        `on_device` is called when the call first holds the device."""
        prepared = [self.prepare(item, attempt) for item in items]
        pending = [p for p in prepared if p.request is not None]
        while pending:  # a gated row that missed a gate goes round again with its next seed
            # 1. The device, back to back: the pipeline call, then the image encoder's
            with self.device.lock:
                if on_device is not None:
                    on_device()
                    on_device = None
                rendered, similarities = self.device.call(pending)
            # 2. The CPU, while the device renders the next batch: scores, gates, encode, upload
            with self.frames.holding(sum(video.frames.nbytes for _, video in rendered)):
                pending = [
                    p
                    for (p, video), similarity in zip(rendered, similarities, strict=True)
                    if self.judge(p, video, similarity)
                ]
        return [p.row for p in prepared]

    def figures(self) -> dict[str, float] | None:
        """The device's figures so far, for the run record (see device.py); None before its
        first call."""
        clock = self.device.clock
        if clock.busy is None:
            return None
        return {
            "busy": clock.busy,
            "busy_s": clock.busy_s,
            "frames_peak_bytes": float(self.frames.peak),
            "videos": float(self.cpu.videos),
            **{f"cpu_{stage}_s": seconds for stage, seconds in self.cpu.seconds.items()},
        }

    def settle(self, rows: list[ResultRow]) -> tuple[list[ResultRow], list[ResultRow]]:
        """(the rows to hand back now, the rows of every shard committed since; writing.py)."""
        return self.writing.shards.settle(rows) if self.writing.shards else (rows, [])

    @property
    def holding(self) -> int:
        """Rows in the open shard."""
        return self.writing.shards.holding if self.writing.shards else 0

    def close(self) -> None:
        """Commit the open shard: the worker is ending. `settle` hands over its rows."""
        if self.writing.shards is not None:
            self.writing.shards.close()

    def prepare(self, item: WorkItem, attempt: int) -> Prepared:
        """The row (failed until written) and its render request; a row that cannot be
        rendered fails here, naming the stage."""
        row = ResultRow.for_item(
            item,
            Status.failed,
            model_path=self.model.path,
            model_sha256=self.model.sha256,
            node=self.node,
            device=self.model.device,
            dtype=self.model.dtype,
            worker=self.worker_id,
            attempt=attempt,
            started_at=now(),
        )
        with self._lock:
            if not self._loads_reported:
                # The model load belongs to the first row this worker makes, not to every row.
                row.load_s, row.load_peak_rss_mb, self._loads_reported = self.load_s, self.load_peak_rss_mb, True
        prepared, stage = Prepared(item, row), Stage.params
        try:
            params = row.params = self.renderer.resolve(item.params)
            stage = Stage.image
            data = self.inputs.read(item.image) if item.image_bytes is None else item.image_bytes
            image = load_image(data, params.width, params.height, params.fit)
            row.input_width, row.input_height, row.input_sha256 = image.width, image.height, image.sha256
            stage = Stage.latents
            latents = None
            if params.latents is not None:
                latents = np.load(io.BytesIO(self.inputs.read(params.latents)), allow_pickle=False)
            prepared.request = VideoRequest(image.image, params, item.seed, latents)
        except Exception as exc:
            fail(prepared, stage, exc)
        return prepared

    def refuse(self, item: WorkItem, kind: str, reason: str, attempt: int) -> ResultRow:
        """A failed row for an item not rendered again: retryable, as it failed for its worker."""
        return ResultRow.for_item(
            item,
            Status.failed,
            error=f"row {item.line} (id {item.id!r}): {Stage.worker}: {kind}: {reason}",
            error_stage=Stage.worker,
            error_type=kind,
            retryable=True,
            node=self.node,
            worker=self.worker_id,
            attempt=attempt,
            ended_at=now(),
        )


class RayWorker:
    """Ray Data callable: `__init__` loads once, `__call__` takes a batch of work items.

    Ray runs `workers.calls` calls of it at once (a threaded actor), each in a slot of its
    own: while one renders, the other is written (see the module's docstring).

    Before each call it tells the run's JobControl which rows it starts, so that when a worker
    dies the rows it had in flight are known. A batch with such rows is rendered one row per
    call: only the row that kills its worker dies with it, and after `workers.max_attempts`
    deaths that row fails alone while its batch-mates are made. A call that outlives
    `workers.row_timeout_s` per row from the moment it holds the device ends the worker (the
    only way to stop a stuck pipeline call); Ray restarts it, and the row, if alone, ends
    failed as retryable. A death is charged to the call that held the device (JobControl).

    With `shards`, a row in the worker's open shard is not handed back with its call: the rows
    of a committed shard go to the JobControl at once (a later death cannot lose them), and the
    driver takes them from there. The last shard is committed when Ray Data ends the worker.
    """

    def __init__(self, spec_json: str, run_id: str) -> None:
        import ray

        context = ray.get_runtime_context()
        self.spec = JobSpec.model_validate_json(spec_json)
        self.worker = RowWorker(self.spec)
        self.worker.node = f"{self.worker.node}/{context.get_node_id()[:12]}"
        self.worker.worker_id = context.get_actor_id()[:16]
        self.metrics = WorkerMetrics(self.spec.name, self.worker.worker_id, context.was_current_actor_reconstructed)
        self.control = _control(run_id)
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.spec.workers.calls):
            self._slots.put(slot)
        if self.spec.shards is not None:  # after a restart: the open shard died with the last process
            self._tell(self.control, "shard_rows", 0, [], True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        slot = self._slots.get()
        try:
            return self._call(batch, slot)
        finally:
            self._slots.put(slot)

    def _call(self, batch: pa.Table, slot: int) -> pa.Table:
        items = items_from_table(batch)
        invalid = [invalid_row(i, now()) for i in items if i.error is not None]
        items = [i for i in items if i.error is None]
        if not items:
            return rows_to_table(invalid)
        control = self.control
        answer = self._tell(control, "begin", os.getpid(), [i.key for i in items], slot=slot)
        draining, history = answer if answer is not None else (False, {})
        if draining:
            return rows_to_table(invalid)  # the rest not started: left for the next run
        if not history:
            try:
                with self._watchdog(control, items, slot) as on_device:
                    rows = self._settle(control, self._process(items, on_device=on_device))
            finally:
                self._tell(control, "end", slot=slot)
            return rows_to_table(invalid + rows)
        return rows_to_table(invalid + self._one_by_one(control, items, history, slot))

    def __del__(self) -> None:
        """Ray Data ends its workers when the stream is done: the last shard is committed here."""
        if getattr(self, "worker", None) is not None and self.worker.holding:
            self.worker.close()
            self._settle(self.control, [])

    def _process(
        self, items: list[WorkItem], attempt: int = 1, on_device: Callable[[], None] | None = None
    ) -> list[ResultRow]:
        rows = self.worker.process(items, attempt, on_device)
        self.metrics.call(rows, self.worker.device.clock.busy)
        if (figures := self.worker.figures()) is not None:
            self._tell(self.control, "device", os.getpid(), figures)
        return rows

    def _settle(self, control: Any, rows: list[ResultRow]) -> list[ResultRow]:
        """The rows to return from a call: those of committed shards go to the JobControl."""
        now, committed = self.worker.settle(rows)
        if self.spec.shards is None:
            return now
        answer = self._tell(control, "shard_rows", self.worker.holding, [row.model_dump() for row in committed])
        return now if answer is not None else now + committed

    def _one_by_one(
        self, control: Any, items: list[WorkItem], history: dict[str, History], slot: int
    ) -> list[ResultRow]:
        rows = []
        for item in items:
            past = history.get(item.key, History())
            if past.row is not None:
                if past.row.get("shard_uri") is None:  # a shard's rows were handed over when it was committed
                    rows.append(ResultRow.model_validate(past.row))
                continue
            refused = refusal(past, self.spec.workers)
            if refused:
                rows.append(self.worker.refuse(item, *refused, attempt=past.deaths + int(past.timed_out)))
                continue
            answer = self._tell(control, "begin", os.getpid(), [item.key], True, slot=slot)
            if answer is not None and answer[0]:
                break  # drained meanwhile: the rest are left for the next run
            made: list[ResultRow] = []
            try:
                with self._watchdog(control, [item], slot) as on_device:
                    made = self._settle(control, self._process([item], past.deaths + 1, on_device))
            finally:
                # A row in the open shard is not made yet: after a death it is rendered again.
                self._tell(control, "end", {row.key: row.model_dump() for row in made}, slot=slot)
            rows += made
        return rows

    def _watchdog(self, control: Any, items: list[WorkItem], slot: int) -> AbstractContextManager[Callable[[], None]]:
        return watchdog(partial(self._tell, control), items, slot, self.spec.workers.row_timeout_s)

    def _tell(self, control: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        if control is None:
            return None
        try:
            return ray.get(getattr(control, method).remote(self.worker.worker_id, *args, **kwargs))
        except ray.exceptions.RayActorError:
            # A control actor gone with its node: rows must not fail for want of it, so the
            # worker goes on rendering without drain requests or death counts.
            return None


def _control(run_id: str) -> Any:
    import ray

    try:
        return ray.get_actor(JobControl.name(run_id))
    except ValueError:  # a driver that made none (or an embedding program): no control
        return None


def worker_class(spec_json: str, run_id: str) -> type[RayWorker]:
    """A RayWorker with the spec built in: Ray Data then has no constructor arguments to keep
    in the object store, which a restarted actor could find gone (ray issue 53727)."""

    class SpecRayWorker(RayWorker):
        def __init__(self) -> None:
            super().__init__(spec_json, run_id)

    return SpecRayWorker

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

import datetime as dt
import io
import os
import queue
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from svd_batch.control import History, JobControl
from svd_batch.device import CpuClock, DeviceClock, FrameMeter
from svd_batch.encode import encode
from svd_batch.engine import simulated
from svd_batch.engine.loader import LoadedModel, load_pipeline
from svd_batch.engine.renderer import OutputError, RenderedVideo, Renderer, VideoRequest
from svd_batch.errors import first_line, is_retryable
from svd_batch.images import load_image
from svd_batch.inputs import InputPolicy
from svd_batch.metadata import rows_to_table
from svd_batch.metrics import WorkerMetrics
from svd_batch.plan import retry_seed
from svd_batch.planning import invalid_row, items_from_table
from svd_batch.schema import ClipScores, Format, JobSpec, ResultRow, Stage, Status, TryRecord, WorkItem
from svd_batch.scores import consistency, score_clip
from svd_batch.shards import OpenShard, jpeg, sample_json
from svd_batch.storage import open_storage


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Prepared:
    item: WorkItem
    row: ResultRow
    request: VideoRequest | None = None
    tries: list[TryRecord] = field(default_factory=list)  # of a gated row, so far
    best: tuple[TryRecord, RenderedVideo] | None = None  # the try that missed the fewest gates


def _tries(item: WorkItem) -> int:
    """Renders an item may take: its gates' max_tries."""
    return item.params.quality.max_tries if item.params.quality else 1


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
    is the open shard."""

    def __init__(self, spec: JobSpec) -> None:
        started = time.perf_counter()
        self.spec = spec
        # One thread per clip's scores: the device no longer waits for them, so what counts
        # is CPU seconds per clip, which OpenCV's own threads only add to on a busy host.
        cv2.setNumThreads(1)
        self.model, self.renderer = _engine(spec)
        self.device = threading.Lock()
        self.clock = DeviceClock()
        self.cpu = CpuClock()
        self.frames = FrameMeter()
        self._lock = threading.RLock()  # what calls share beside the device: the open shard, the load report
        self.storage = open_storage(spec.output)
        self.inputs = InputPolicy.for_spec(spec)
        self.node = socket.gethostname()
        self.worker_id = f"pid-{os.getpid()}"
        self.load_s = time.perf_counter() - started
        self.load_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        self._loads_reported = False
        self.shard: OpenShard | None = None  # the spec's `shards`: this worker's open shard
        self._committed: list[ResultRow] = []  # rows of shards committed (or failed to), not handed over yet
        # The rows handed to a shard, by id(), until their own call settles: never handed back
        # with it. Held, not just their ids: no other row can take an id while it is listed.
        self._sharded: dict[int, ResultRow] = {}

    def process(
        self, items: Sequence[WorkItem], attempt: int = 1, on_device: Callable[[], None] | None = None
    ) -> list[ResultRow]:
        """One result row per item, in order; a bad item never costs another its video.
        `on_device` is called when the call first holds the device."""
        prepared = [self._prepare(item, attempt) for item in items]
        pending = [p for p in prepared if p.request is not None]
        while pending:  # a gated row that missed a gate goes round again with its next seed
            # 1. The device, back to back: the pipeline call, then the image encoder's
            with self.device:
                if on_device is not None:
                    on_device()
                    on_device = None
                rendered, similarities = self._on_device(pending)
            # 2. The CPU, while the device renders the next batch: scores, gates, encode, upload
            with self.frames.holding(sum(video.frames.nbytes for _, video in rendered)):
                pending = [
                    p
                    for (p, video), similarity in zip(rendered, similarities, strict=True)
                    if self._judge(p, video, similarity)
                ]
        return [p.row for p in prepared]

    def _on_device(
        self, pending: list[_Prepared]
    ) -> tuple[list[tuple[_Prepared, RenderedVideo]], list[float | Exception]]:
        started_at = _now()
        with self.clock.computing():
            started = time.perf_counter()
            rendered = []
            for p, video in zip(pending, self._render([p.request for p in pending]), strict=True):
                if isinstance(video, Exception):
                    self._fail(p, Stage.render, video)
                else:
                    rendered.append((p, video))
            similarities = self._consistency(rendered)
            share = (time.perf_counter() - started) / len(pending)
        ended_at = _now()
        for p in pending:
            p.row.device_s = (p.row.device_s or 0.0) + share
            p.row.device_started_at, p.row.device_ended_at = started_at, ended_at
        return rendered, similarities

    def figures(self) -> dict[str, float] | None:
        """The device's figures so far, for the run record (see device.py); None before its
        first call."""
        if self.clock.busy is None:
            return None
        return {
            "busy": self.clock.busy,
            "busy_s": self.clock.busy_s,
            "frames_peak_bytes": float(self.frames.peak),
            "videos": float(self.cpu.videos),
            **{f"cpu_{stage}_s": seconds for stage, seconds in self.cpu.seconds.items()},
        }

    def settle(self, rows: list[ResultRow]) -> tuple[list[ResultRow], list[ResultRow]]:
        """Split what `process` returned: (the rows to hand back now, the rows of every shard
        committed since the last call). The rows in the open shard are neither: they are
        handed over when their shard is committed, and lost with it."""
        with self._lock:
            # A row's own call decides it, even when another call committed its shard and
            # handed it over first (calls run in threads): each row is handed over once.
            now = [row for row in rows if self._sharded.pop(id(row), None) is None]
            committed, self._committed = self._committed, []
            return now, committed

    @property
    def holding(self) -> int:
        """Rows in the open shard."""
        return len(self.shard.rows) if self.shard else 0

    def close(self) -> None:
        """Commit the open shard: the worker is ending. `settle` hands over its rows."""
        with self._lock:
            if self.shard is not None:
                self._commit_shard()
                self.shard.remove()
                self.shard = None

    def _consistency(self, rendered: list[tuple[_Prepared, RenderedVideo]]) -> list[float | Exception]:
        """Each video's consistency score, from one call of the image encoder for them all: device
        work, counted in the rows' device_s."""
        if not rendered:
            return []
        try:
            fitted = [np.asarray(p.request.image) for p, _ in rendered]  # type: ignore[union-attr]
            return list(consistency(self.renderer.image_embeddings, fitted, [video.frames for _, video in rendered]))
        except Exception as exc:
            return [exc] * len(rendered)

    def _prepare(self, item: WorkItem, attempt: int) -> _Prepared:
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
            started_at=_now(),
        )
        with self._lock:
            if not self._loads_reported:
                # The model load belongs to the first row this worker makes, not to every row.
                row.load_s, row.load_peak_rss_mb, self._loads_reported = self.load_s, self.load_peak_rss_mb, True
        prepared, stage = _Prepared(item, row), Stage.params
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
            self._fail(prepared, stage, exc)
        return prepared

    def _render(self, requests: list[VideoRequest]) -> list[RenderedVideo | Exception]:
        if not requests:
            return []
        try:
            return list(self.renderer.render(requests))
        except Exception as exc:
            if len(requests) == 1:
                return [self._again_in_float32(requests[0], exc)]
        # A shared call failed: render each request alone so that only the culprit fails.
        results: list[RenderedVideo | Exception] = []
        for request in requests:
            try:
                results.extend(self.renderer.render([request]))
            except Exception as exc:
                results.append(self._again_in_float32(request, exc))
        return results

    def _again_in_float32(self, request: VideoRequest, exc: Exception) -> RenderedVideo | Exception:
        """NaN or black frames from a half-precision model are most often an overflow: one retry
        in float32. A float32 model would compute the same frames again, so it is not retried."""
        if not isinstance(exc, OutputError) or self.model.dtype == "fp32":
            return exc
        try:
            with self.model.in_float32():
                video = self.renderer.render([request])[0]
        except Exception as again:
            return OutputError(f"{exc}; again in fp32: {again}")
        video.recovery.append(f"{exc} in {self.model.dtype}; rendered again in fp32")
        video.dtype = "fp32"
        return video

    def _judge(self, p: _Prepared, video: RenderedVideo, similarity: float | Exception) -> bool:
        """Score a render and write the row, unless it missed a gate with tries left: then
        True, and the request carries the next seed."""
        row, request = p.row, p.request
        assert request is not None
        row.denoise_s = (row.denoise_s or 0.0) + video.denoise_s  # what every try cost
        row.decode_s = (row.decode_s or 0.0) + video.decode_s
        started = time.perf_counter()
        try:
            if isinstance(similarity, Exception):
                raise similarity
            with self.cpu.stage("score"):
                scores = score_clip(video.frames, np.asarray(request.image), similarity)
        except Exception as exc:
            self._fail(p, Stage.score, exc)
            return False
        row.score_s = (row.score_s or 0.0) + time.perf_counter() - started
        gates = row.params.quality
        if gates is None:
            self._write(p, video, scores)
            return False
        p.tries.append(TryRecord(seed=request.seed, scores=scores, failed_gates=gates.failed(scores)))
        if not p.tries[-1].failed_gates:
            self._write(p, video, scores, p.tries[-1])
            return False
        if p.best is None or len(p.tries[-1].failed_gates) < len(p.best[0].failed_gates):
            p.best = (p.tries[-1], video)
        if len(p.tries) < gates.max_tries:
            p.request = replace(request, seed=retry_seed(p.item.seed, len(p.tries)))
            return True
        best, video = p.best
        self._write(p, video, best.scores, best, Status.rejected, upload=gates.keep_rejected)
        return False

    def _write(
        self,
        p: _Prepared,
        video: RenderedVideo,
        scores: ClipScores,
        kept_try: TryRecord | None = None,
        status: Status = Status.ok,
        upload: bool = True,
    ) -> None:
        row = p.row
        for name, value in scores.model_dump().items():
            setattr(row, f"score_{name}", value)
        if kept_try is not None:
            row.seed, row.failed_gates = kept_try.seed, kept_try.failed_gates
            row.tries, row.try_scores = len(p.tries), p.tries
        row.dtype = video.dtype or row.dtype
        planned = p.item.params.decode_chunk_size or row.params.num_frames
        if video.decode_chunk_size != planned:
            row.params = row.params.model_copy(update={"decode_chunk_size": video.decode_chunk_size})
            video.recovery.append(f"out of memory in decode; decode_chunk_size {planned} -> {video.decode_chunk_size}")
        row.recovery = "; ".join(video.recovery) or None
        if upload:
            self._upload(p, video, status)
        else:
            self._complete(row, status)

    def _complete(self, row: ResultRow, status: Status) -> None:
        if row.error_stage is None:
            row.status, row.error, row.ended_at = status, None, _now()
            self.cpu.made()

    def _upload(self, p: _Prepared, video: RenderedVideo, status: Status) -> None:
        row = p.row
        for column, uri in p.item.kept.items():  # made by an earlier run: kept, not written again
            setattr(row, column, uri)
        missing = [fmt for fmt in self.spec.formats if f"{fmt}_uri" not in p.item.kept]
        to_shard = status == Status.ok and self.spec.shards is not None and "shard_uri" not in p.item.kept
        uploaded: list[str] = []
        fps = p.item.params.export_fps
        try:
            with tempfile.TemporaryDirectory(prefix="svd-batch-") as tmp:
                started = time.perf_counter()
                with self.cpu.stage("encode", children=True):
                    written = {fmt: encode(video.frames, fmt, fps, Path(tmp), "video") for fmt in missing}
                    if to_shard:
                        sample = written.get(Format.mp4) or encode(video.frames, Format.mp4, fps, Path(tmp), "sample")
                row.encode_s = time.perf_counter() - started
                started = time.perf_counter()
                with self.cpu.stage("upload"):
                    for fmt, files in written.items():
                        keys = [self._key(p.item.key, fmt, f) for f in files]
                        for file, key in zip(files, keys, strict=True):
                            self.storage.put_file(file, key)
                            uploaded.append(key)
                        uri = self.storage.uri(keys[0])
                        setattr(row, f"{fmt}_uri", uri if fmt != "png" else uri.rsplit("/", 1)[0] + "/")
                    row.upload_s = time.perf_counter() - started
                    # Complete before it joins the shard: a call in another thread may fill the
                    # shard, commit it and hand its rows over at once.
                    self._complete(row, status)
                    if to_shard:
                        self._to_shard(p, video, sample[0])
        except Exception as exc:
            self._fail(p, Stage.output, exc)
            self._discard(row, uploaded)

    def _to_shard(self, p: _Prepared, video: RenderedVideo, mp4: Path) -> None:
        """The row's sample into the open shard (committed when full); its row is held until then."""
        assert self.spec.shards is not None and p.request is not None
        members = {
            "mp4": mp4.read_bytes(),
            "json": sample_json(p.row),
            "input.jpg": jpeg(np.asarray(p.request.image)),
            "poster.jpg": jpeg(video.frames[0]),
        }
        with self._lock:
            if self.shard is None:
                self.shard = OpenShard(self.storage, p.item.run_id, self.spec.shards.size)
            self.shard.add(p.row, members)
            self._sharded[id(p.row)] = p.row
            if self.shard.full:
                self._commit_shard()

    def _commit_shard(self) -> None:
        """A shard that cannot be committed fails its rows (retryably): they are rendered again."""
        assert self.shard is not None
        rows = list(self.shard.rows)
        try:
            self._committed += self.shard.commit()
        except Exception as exc:
            for row in rows:
                self._discard(row, [])
                row.shard_member = None
                row.status, row.error_stage, row.error_type = Status.failed, Stage.output, type(exc).__name__
                row.error = (
                    f"row (id {row.id!r}, video {row.video_index}): {Stage.output}: the shard holding it "
                    f"could not be committed: {first_line(exc)}; the next run renders it again"
                )
                row.retryable = True
            self._committed += rows

    def _discard(self, row: ResultRow, uploaded: list[str]) -> None:
        """A failed row points at nothing: what it uploaded is deleted, and no URI is kept (a kept
        format's object stays, for the next run to keep again)."""
        for column in (f"{fmt}_uri" for fmt in Format):
            setattr(row, column, None)
        for key in uploaded:
            try:
                self.storage.delete(key)
            except Exception as exc:  # the row fails anyway; say what stays behind
                row.error += f"; {self.storage.uri(key)} could not be deleted ({first_line(exc)})"

    @staticmethod
    def _key(stem: str, fmt: str, file: Path) -> str:
        if fmt == "png":
            return f"{stem}.frames/{file.name}"
        return f"{stem}{file.suffix}"

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
            ended_at=_now(),
        )

    @staticmethod
    def _fail(p: _Prepared, stage: Stage, exc: BaseException) -> None:
        # The same shape as the driver's RowError: row number, id, where it failed, why and the fix.
        row = p.row
        row.error = f"row {p.item.line} (id {p.item.id!r}): {stage}: {first_line(exc, with_type=True)}"
        row.status, row.error_stage, row.error_type, row.ended_at = Status.failed, stage, type(exc).__name__, _now()
        row.retryable = is_retryable(exc)


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
        invalid = [invalid_row(i, _now()) for i in items if i.error is not None]
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
        self.metrics.call(rows, self.worker.clock.busy)
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
            refusal = self._refusal(past)
            if refusal:
                rows.append(self.worker.refuse(item, *refusal, attempt=past.deaths + int(past.timed_out)))
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

    def _refusal(self, past: History) -> tuple[str, str] | None:
        """(error type, reason) when the row is not to be tried again in this run."""
        workers = self.spec.workers
        if past.timed_out:
            return "RowTimeout", (
                f"took longer than workers.row_timeout_s ({workers.row_timeout_s:g} s), so its worker "
                "was restarted; the next run tries it again (raise row_timeout_s if such rows need longer)"
            )
        if past.deaths >= workers.max_attempts:
            return "WorkerDied", (
                f"its worker died {past.deaths} times while rendering it (workers.max_attempts "
                f"{workers.max_attempts}), the last times alone; check its image and parameters. The next run "
                "tries it again"
            )
        return None

    @contextmanager
    def _watchdog(self, control: Any, items: list[WorkItem], slot: int) -> Iterator[Callable[[], None]]:
        """Yields what a call does when it first holds the device: start its clock (its time
        counts from then, not while it waits behind the other slot's render), and tell the
        JobControl, which charges a death to the call on the device."""
        rows = len(items)

        def expire() -> None:
            if rows == 1:  # alone: the row itself is too slow (with batch-mates: find out one by one)
                self._tell(control, "timed_out", slot=slot)
            print(f"svd-batch: a call of {rows} row(s) outlived workers.row_timeout_s; restarting", flush=True)
            os._exit(1)

        # row_timeout_s is per render: a gated row may take max_tries of them.
        timer = threading.Timer(self.spec.workers.row_timeout_s * sum(map(_tries, items)), expire)
        timer.daemon = True

        def on_device() -> None:
            timer.start()
            self._tell(control, "device_taken", os.getpid(), slot=slot)

        try:
            yield on_device
        finally:
            timer.cancel()

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

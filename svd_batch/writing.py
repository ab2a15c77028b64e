"""A judged video into storage: its row's fields, its formats encoded and uploaded (or kept
from an earlier run), and with `shards` its sample into the worker's open shard, whose rows
are held until the shard is committed. A row that fails here points at nothing."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from svd_batch.device import CpuClock
from svd_batch.encode import encode
from svd_batch.engine.renderer import RenderedVideo
from svd_batch.errors import first_line
from svd_batch.preparing import Prepared, fail, now
from svd_batch.schema import ClipScores, Format, JobSpec, ResultRow, Stage, Status, TryRecord
from svd_batch.shards import OpenShard, jpeg, sample_json
from svd_batch.storage import Storage


class Writing:
    def __init__(self, spec: JobSpec, storage: Storage, cpu: CpuClock) -> None:
        self.spec, self.storage, self.cpu = spec, storage, cpu
        self.shards = WorkerShards(storage, spec.shards.size) if spec.shards is not None else None

    def write(
        self,
        p: Prepared,
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
            row.status, row.error, row.ended_at = status, None, now()
            self.cpu.made()

    def _upload(self, p: Prepared, video: RenderedVideo, status: Status) -> None:
        row = p.row
        for column, uri in p.item.kept.items():  # made by an earlier run: kept, not written again
            setattr(row, column, uri)
        missing = [fmt for fmt in self.spec.formats if f"{fmt}_uri" not in p.item.kept]
        to_shard = status == Status.ok and self.shards is not None and "shard_uri" not in p.item.kept
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
                        keys = [_key(p.item.key, fmt, f) for f in files]
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
            fail(p, Stage.output, exc)
            discard(row, self.storage, uploaded)

    def _to_shard(self, p: Prepared, video: RenderedVideo, mp4: Path) -> None:
        assert self.shards is not None and p.request is not None
        members = {
            "mp4": mp4.read_bytes(),
            "json": sample_json(p.row),
            "input.jpg": jpeg(np.asarray(p.request.image)),
            "poster.jpg": jpeg(video.frames[0]),
        }
        self.shards.add(p.row, members, p.item.run_id)


class WorkerShards:
    """The worker's open shard: a row's sample joins it, and the row is held until the shard is
    committed (when full, or when the worker ends); calls in several threads share it."""

    def __init__(self, storage: Storage, size: int) -> None:
        self.storage, self.size = storage, size
        self.shard: OpenShard | None = None
        self._lock = threading.RLock()
        self._committed: list[ResultRow] = []  # rows of shards committed (or failed to), not handed over yet
        # The rows handed to a shard, by id(), until their own call settles: never handed back
        # with it. Held, not just their ids: no other row can take an id while it is listed.
        self._sharded: dict[int, ResultRow] = {}

    @property
    def holding(self) -> int:
        """Rows in the open shard."""
        return len(self.shard.rows) if self.shard else 0

    def add(self, row: ResultRow, members: dict[str, bytes], run_id: str) -> None:
        with self._lock:
            if self.shard is None:
                self.shard = OpenShard(self.storage, run_id, self.size)
            self.shard.add(row, members)
            self._sharded[id(row)] = row
            if self.shard.full:
                self._commit()

    def settle(self, rows: list[ResultRow]) -> tuple[list[ResultRow], list[ResultRow]]:
        """Split what a call returned: (the rows to hand back now, the rows of every shard
        committed since the last call). The rows in the open shard are neither: they are
        handed over when their shard is committed, and lost with it."""
        with self._lock:
            # A row's own call decides it, even when another call committed its shard and
            # handed it over first (calls run in threads): each row is handed over once.
            now = [row for row in rows if self._sharded.pop(id(row), None) is None]
            committed, self._committed = self._committed, []
            return now, committed

    def close(self) -> None:
        """Commit the open shard: the worker is ending. `settle` hands over its rows."""
        with self._lock:
            if self.shard is not None:
                self._commit()
                self.shard.remove()
                self.shard = None

    def _commit(self) -> None:
        """A shard that cannot be committed fails its rows (retryably): they are rendered again."""
        assert self.shard is not None
        rows = list(self.shard.rows)
        try:
            self._committed += self.shard.commit()
        except Exception as exc:
            for row in rows:
                discard(row, self.storage, [])
                row.shard_member = None
                row.status, row.error_stage, row.error_type = Status.failed, Stage.output, type(exc).__name__
                row.error = (
                    f"row (id {row.id!r}, video {row.video_index}): {Stage.output}: the shard holding it "
                    f"could not be committed: {first_line(exc)}; the next run renders it again"
                )
                row.retryable = True
            self._committed += rows


def discard(row: ResultRow, storage: Storage, uploaded: list[str]) -> None:
    """A failed row points at nothing: what it uploaded is deleted, and no URI is kept (a kept
    format's object stays, for the next run to keep again)."""
    for column in (f"{fmt}_uri" for fmt in Format):
        setattr(row, column, None)
    for key in uploaded:
        try:
            storage.delete(key)
        except Exception as exc:  # the row fails anyway; say what stays behind
            row.error += f"; {storage.uri(key)} could not be deleted ({first_line(exc)})"


def _key(stem: str, fmt: str, file: Path) -> str:
    if fmt == "png":
        return f"{stem}.frames/{file.name}"
    return f"{stem}{file.suffix}"

"""WebDataset shards: each worker fills its own tar and commits it whole.

A sample is `<member>.mp4`, `<member>.json` (the row's parameters, seed, scores, tags, caption
and passthrough columns), `<member>.input.jpg` (the fitted input) and `<member>.poster.jpg` (the
first frame). WebDataset readers (the `webdataset` library, Ray Data's `read_webdataset`) group
a tar's files into samples by the part of the file name before its first dot, so a member is
the output key's base name with its dots replaced.

A shard is filled in a local file and put to `<output>/shards/` in one piece when it is full (or
its worker ends), so a reader never sees half a shard. Its rows name it only after that, so a
worker that dies with an open shard loses exactly the rows in it: they are not done, and the
next run renders them again. `reconcile` deletes shards that no metadata row names (a driver
that died between a shard's commit and its rows' commit) and writes `shards/index.parquet`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from svd_batch.ledger import latest, pid_gone
from svd_batch.metadata import read_table
from svd_batch.schema import ClipScores, ResultRow, Status
from svd_batch.storage import Storage

PREFIX = "shards"
INDEX = f"{PREFIX}/index.parquet"
INDEX_COLUMNS = ["shard_uri", "shard_member", "key", "id", "video_index"]
# A worker's local folder for its open shard: `<LOCAL><pid>-<random>` in the temp dir.
LOCAL = "svd-batch-shard-"


def member_name(key: str) -> str:
    """The sample key of an output key: its base name, with no dot (readers split there)."""
    return PurePosixPath(key).name.replace(".", "_")


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)[..., :3]).convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def sample_json(row: ResultRow) -> bytes:
    """What a training loader needs of the row, beside the clip: how it was made and scored."""
    scores = {name: getattr(row, f"score_{name}") for name in ClipScores.model_fields}
    return json.dumps(
        {
            "id": row.id,
            "video_index": row.video_index,
            "key": row.key,
            "seed": row.seed,
            "params": row.params.model_dump(mode="json") if row.params else None,
            "scores": scores,
            "tries": row.tries,
            "tags": json.loads(row.tags) if row.tags else None,
            "caption": row.caption,
            "passthrough": json.loads(row.passthrough) if row.passthrough else None,
            "input_sha256": row.input_sha256,
            "model_sha256": row.model_sha256,
        },
        sort_keys=True,
    ).encode()


class OpenShard:
    """A worker's shard being filled, in a local tar; `commit` puts it to storage whole.

    Shard names are `<run id>-<worker instance>-<number>`: an instance is one process, so a
    restarted worker never writes over a shard its dead predecessor committed."""

    def __init__(self, storage: Storage, run_id: str, size: int) -> None:
        self.storage, self.size = storage, size
        self.name = f"{run_id}-{uuid.uuid4().hex[:8]}"
        _remove_dead(Path(tempfile.gettempdir()))
        self.local = Path(tempfile.mkdtemp(prefix=f"{LOCAL}{os.getpid()}-"))
        self.number = 0
        self.rows: list[ResultRow] = []  # in the open shard: named by no metadata row yet
        self._tar: tarfile.TarFile | None = None

    @property
    def path(self) -> Path:
        return self.local / f"{self.name}-{self.number:05d}.tar"

    def add(self, row: ResultRow, members: dict[str, bytes]) -> None:
        """`members`: file name suffix (e.g. `mp4`, `input.jpg`) -> its bytes."""
        if self._tar is None:
            self._tar = tarfile.open(self.path, "w")  # noqa: SIM115 (open across calls, until commit)
        member = member_name(row.key)
        now = time.time()
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{member}.{suffix}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._tar.fileobj.flush()  # type: ignore[union-attr]  # whole samples on disk: what a look at a worker finds
        self.rows.append(row)
        row.shard_member = member

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.size

    def commit(self) -> list[ResultRow]:
        """Put the shard to storage in one piece; its rows now name it. Returns them."""
        if self._tar is None:
            return []
        self._tar.close()
        rows, path = self.rows, self.path
        self._tar, self.rows = None, []
        self.number += 1
        try:
            uri = self.storage.put_file(path, f"{PREFIX}/{path.name}")
        finally:
            path.unlink()
        for row in rows:
            row.shard_uri = uri
        return rows

    def remove(self) -> None:
        """The worker is ending and its last shard is committed: its local folder goes."""
        shutil.rmtree(self.local, ignore_errors=True)


def _remove_dead(temp: Path) -> None:
    """The local folders of workers that were killed: their open shards are lost anyway."""
    for folder in temp.glob(f"{LOCAL}*"):
        pid = folder.name.removeprefix(LOCAL).split("-", 1)[0]
        if pid.isdigit() and pid_gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def reconcile(output: Storage, meta: Storage) -> int:
    """Delete shards no metadata row names, and write the index of those that are (one row
    per sample: the latest ok row of each key). Returns how many shards were deleted."""
    table = latest(read_table(meta, ["status", "run_id", "ended_at", *INDEX_COLUMNS]))
    ok = pc.equal(table.column("status"), Status.ok.value)
    named = table.filter(pc.and_(ok, pc.is_valid(table.column("shard_uri"))))
    known = set(named.column("shard_uri").unique().to_pylist())
    deleted = 0
    for key in output.list(PREFIX):
        if key.endswith(".tar") and output.uri(key) not in known:
            output.delete(key)
            deleted += 1
    index = named.select(INDEX_COLUMNS).sort_by([("shard_uri", "ascending"), ("shard_member", "ascending")])
    with tempfile.NamedTemporaryFile(suffix=".parquet") as local:
        pq.write_table(index.rename_columns(["shard", "member", "key", "id", "video_index"]), local.name)
        output.put_file(Path(local.name), INDEX)
    return deleted

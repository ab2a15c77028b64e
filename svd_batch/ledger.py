"""The ledger: what earlier runs made, what each run did, and which run holds the output now.

One definition serves status, report and resume alike: the *latest* row of a key is the
newest row a run produced for it (`ok`, `failed` or `rejected`; `skipped` rows of older
versions are not produced rows and are ignored). A key is *done* when its latest row is `ok`
and carries a URI for every format the spec asks for, or is `rejected` (its gates are in its
key: changed gates make new keys, judged again). A failed key comes back on the next plain run when its
failure was retryable; a final failure waits for `--retry-failed`.

Each run leaves `runs/<run_id>.json` beside the metadata folder (schema.RunRecord), and holds a lease while it runs:
`_lease/<generation>.json`, created only if absent (O_EXCL locally, `If-None-Match: *` on
S3), so two starts can never both win. The holder rewrites its own generation as a
heartbeat; a later run takes over a lease whose heartbeat is older than its TTL (or whose
holder's process is gone from the same host) by creating the next generation, which again
only one run can do, and marks the record of the run it took over from `lost`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from svd_batch.errors import first_line
from svd_batch.hashes import string_hashes
from svd_batch.metadata import part_keys, read_table
from svd_batch.schema import LeaseRecord, RunRecord, Status
from svd_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def latest(table: pa.Table) -> pa.Table:
    """One row per key: the newest a run produced (run ids sort by start, then end time), in
    the order they were read (parts sort by run)."""
    return _latest(table)[0]


def _latest(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """`latest`, and the hash of each of its keys. Only rows whose key hash repeats are
    ordered, and by hash, not by key: at ten million keys a sort of strings (or Arrow's hash
    grouping) takes 13 s. Two keys of one hash are told apart by a sort of the strings."""
    produced = pc.is_in(table.column("status"), pa.array([s.value for s in Status]))
    if not pc.all(produced).as_py():  # a copy of the table, so only where skipped rows are there
        table = table.filter(produced)
    hashes = string_hashes(table.column("key"))
    ordered = np.sort(hashes)
    repeated = KeySet.of_hashes(np.unique(ordered[1:][ordered[1:] == ordered[:-1]]))
    if not len(repeated):
        return table, hashes
    rows = np.flatnonzero(repeated.has(hashes))
    runs = pc.dictionary_encode(table.column("run_id").take(rows)).combine_chunks()
    names = runs.dictionary.to_numpy(zero_copy_only=False)
    rank = np.append(np.argsort(np.argsort(names)), -1)  # a row without a run sorts first
    run = rank[pc.fill_null(runs.indices, len(names)).to_numpy()]
    ended = pc.fill_null(pc.cast(table.column("ended_at").take(rows), pa.int64()), np.iinfo(np.int64).min)
    order = rows[np.lexsort((ended.to_numpy(), run, hashes[rows]))]  # stable: of rows alike, the last read wins
    last = np.append(hashes[order[:-1]] != hashes[order[1:]], True)
    keys, tied = table.column("key"), np.flatnonzero(~last)
    if not pc.all(pc.equal(keys.take(order[tied]), keys.take(order[tied + 1]))).as_py():
        exact = _latest_by_key(table)
        return exact, string_hashes(exact.column("key"))
    chosen = np.ones(len(hashes), bool)
    chosen[order[tied]] = False
    return table.filter(chosen), hashes[chosen]


def _latest_by_key(produced: pa.Table) -> pa.Table:
    when = [("key", "ascending"), ("run_id", "ascending"), ("ended_at", "ascending")]
    order = pc.sort_indices(produced, when, null_placement="at_start")
    keys = produced.column("key").take(order)
    last = pa.concat_arrays([pc.not_equal(keys[:-1], keys[1:]).combine_chunks(), pa.array([True])])
    return produced.take(np.sort(order.filter(last).to_numpy()))


class KeySet:
    """Keys as sorted 64-bit hashes: 8 bytes a key, where a Python set of strings takes about
    100. A key not in the set is taken for one in it with probability len(set) / 2**64: with
    ten million done keys, one planned video in two trillion is skipped."""

    def __init__(self, keys: pa.ChunkedArray | list[str]) -> None:
        self.hashes = np.sort(string_hashes(keys))

    @classmethod
    def of_hashes(cls, hashes: np.ndarray) -> KeySet:
        held = cls([])
        held.hashes = np.sort(hashes)
        return held

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.has(string_hashes([key]))[0])

    def __len__(self) -> int:
        return len(self.hashes)

    def has(self, hashes: np.ndarray) -> np.ndarray:
        """Which of these key hashes are in the set, in one search."""
        at = np.minimum(np.searchsorted(self.hashes, hashes), max(len(self.hashes) - 1, 0))
        return self.hashes[at] == hashes if len(self.hashes) else np.zeros(len(hashes), bool)


@dataclass(frozen=True)
class Progress:
    """What earlier runs left for this one, from the latest row of every key."""

    done: KeySet  # every asked-for format committed ok, or rejected by its gates
    kept: dict[str, dict[str, str]]  # ok, but formats missing: the URIs of those it has
    final: KeySet  # failed for good: rendered again only with --retry-failed


def progress(
    meta: Storage, formats: list[str], outputs: Storage | None = None, exclude_run: str | None = None
) -> Progress:
    """`formats`: what a done key has (JobSpec.made: its formats, and `shard` for a job with shards).
    `outputs`: check that each done key's objects still exist (`run --verify-outputs`).
    `exclude_run`: the keys that run produced count as done, whatever became of them."""
    wanted = [f"{f}_uri" for f in formats]
    table, hashes = _latest(read_table(meta, ["key", "status", "retryable", "run_id", "ended_at", *wanted]))
    present = pa.array(sorted(_listing(outputs)), pa.string()) if outputs is not None else None
    ok = pc.equal(table.column("status"), Status.ok.value)
    final = pc.and_(pc.equal(table.column("status"), Status.failed.value),
                    pc.invert(pc.fill_null(table.column("retryable"), False)))  # fmt: skip
    have = {}
    for column in wanted:
        uri = table.column(column)
        made = pc.fill_null(pc.not_equal(uri, ""), False)
        have[column] = made if present is None else pc.and_(made, pc.is_in(uri, value_set=present))
    count = functools.reduce(pc.add, [pc.cast(m, pa.int64()) for m in have.values()])
    done = pc.or_(pc.and_(ok, pc.equal(count, len(wanted))), pc.equal(table.column("status"), Status.rejected.value))
    partial = pc.and_(ok, pc.and_(pc.greater(count, 0), pc.less(count, len(wanted))))
    if exclude_run is not None:
        mine = pc.equal(table.column("run_id"), exclude_run)
        done, partial = pc.or_(done, mine), pc.and_(partial, pc.invert(mine))
    rows = table.filter(partial)
    made = {c: m.filter(partial).to_pylist() for c, m in have.items()}
    uris = {c: rows.column(c).to_pylist() for c in wanted}
    kept = {key: {c: uris[c][i] for c in wanted if made[c][i]} for i, key in enumerate(rows.column("key").to_pylist())}
    return Progress(KeySet.of_hashes(hashes[done.to_numpy()]), kept, KeySet.of_hashes(hashes[final.to_numpy()]))


def _listing(outputs: Storage) -> set[str]:
    uris = set()
    for key in [*outputs.list("videos"), *outputs.list("shards")]:
        uris.add(outputs.uri(key))
        uris.add(outputs.uri(str(PurePosixPath(key).parent)) + "/")  # PNG frames: the folder's URI
    return uris


def repair(meta: Storage) -> None:
    """A driver killed while merging its parts leaves them beside the merged file: drop them."""
    keys = part_keys(meta)
    merged = {k.removesuffix("-all.parquet") for k in keys if k.endswith("-all.parquet")}
    for key in keys:
        run = key.rsplit("-", 1)[0]
        if run in merged and not key.endswith("-all.parquet"):
            meta.delete(key)


def write_record(runs: Storage, record: RunRecord) -> None:
    runs.put_bytes(record.model_dump_json(indent=2).encode(), f"{record.run_id}.json")


def run_history(runs: Storage) -> list[RunRecord]:
    """Every run's record, oldest first; one that cannot be read is named and left out."""
    records = []
    for key in runs.list():
        try:
            records.append(RunRecord.model_validate_json(runs.get_bytes(key)))
        except (OSError, StorageError, ValueError) as exc:
            log.warning("ignoring run record %s (%s)", runs.uri(key), first_line(exc))
    return sorted(records, key=lambda r: r.run_id)


def close_lost(runs: Storage, holder: LeaseRecord) -> None:
    """The record of a run whose lease was taken over says `lost` instead of `running` forever."""
    try:
        record = RunRecord.model_validate_json(runs.get_bytes(f"{holder.run_id}.json"))
    except (OSError, StorageError, ValueError):
        return  # it died before writing one, or it is unreadable (named by run_history)
    if record.state == "running":
        last_seen = max(holder.heartbeat_at, record.started_at)
        write_record(runs, record.model_copy(update={"state": "lost", "ended_at": last_seen}))


def _gone(holder: LeaseRecord) -> bool:
    """The holder ran on this host and its process has ended (a killed driver): no need to wait
    out its TTL."""
    return holder.host == socket.gethostname() and pid_gone(holder.pid)


def pid_gone(pid: int) -> bool:
    """No process on this host has the pid. A reused pid only makes this say "alive", the safe side."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class LeaseHeld(RuntimeError):
    """Another run holds the output; the message names it and what to do."""


@dataclass
class Lease:
    storage: Storage  # the metadata prefix
    run_id: str
    ttl_s: float
    on_lost: Callable[[str], None] = lambda reason: None  # the driver drains
    generation: int = -1
    _record: LeaseRecord | None = None
    taken_from: LeaseRecord | None = None  # the holder whose stale lease this run took over
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _key(self, generation: int) -> str:
        return f"{LEASE_DIR}/{generation:08d}.json"

    def _generations(self) -> list[int]:
        names = (PurePosixPath(k).stem for k in self.storage.list(LEASE_DIR))
        return sorted(int(n) for n in names if n.isdigit())

    def _read(self, generation: int) -> LeaseRecord:
        return LeaseRecord.model_validate_json(self.storage.get_bytes(self._key(generation)))

    def acquire(self) -> str | None:
        """Take the lease, or raise LeaseHeld. Returns a line to show when it was taken over."""
        for _ in range(5):  # each turn loses only to a run that won a create meanwhile
            generations = self._generations()
            note = None
            if generations:
                holder = self._read(generations[-1])
                age = (_now() - holder.heartbeat_at).total_seconds()
                if not holder.released:
                    gone = _gone(holder)
                    if age <= holder.ttl_s and not gone:
                        raise LeaseHeld(
                            f"run {holder.run_id} (pid {holder.pid} on {holder.host}) holds its lease "
                            f"since {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC, heartbeat {age:.0f} s ago; wait for "
                            f"it to end, or stop it (a holder silent for {holder.ttl_s:.0f} s is taken over)"
                        )
                    why = (
                        f"its heartbeat is {age:.0f} s old, over its TTL of {holder.ttl_s:.0f} s"
                        if age > holder.ttl_s
                        else "that process is gone from this host"
                    )
                    note = f"taking over the lease of run {holder.run_id} (pid {holder.pid} on {holder.host}): {why}"
                    self.taken_from = holder
            generation = generations[-1] + 1 if generations else 0
            now = _now()
            record = LeaseRecord(
                run_id=self.run_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                ttl_s=self.ttl_s,
                acquired_at=now,
                heartbeat_at=now,
            )
            if self.storage.create(record.model_dump_json().encode(), self._key(generation)):
                self.generation, self._record = generation, record
                for old in generations:  # pruned; one left behind is harmless
                    with contextlib.suppress(StorageError, OSError):
                        self.storage.delete(self._key(old))
                self._thread = threading.Thread(target=self._beat, name="svd-batch-lease", daemon=True)
                self._thread.start()
                return note
        raise LeaseHeld(f"{self.storage.uri(LEASE_DIR)} keeps changing hands; another run is starting, try again")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._generations()[-1] != self.generation:
                    self.on_lost("another run took over the lease (this run's heartbeat was late); stopping")
                    return
                self._write()
            except (StorageError, OSError, IndexError) as exc:
                log.warning("lease heartbeat not written: %s", first_line(exc))

    def _write(self, released: bool = False) -> None:
        assert self._record is not None
        self._record = self._record.model_copy(update={"heartbeat_at": _now(), "released": released})
        self.storage.put_bytes(self._record.model_dump_json().encode(), self._key(self.generation))

    def release(self) -> None:
        """Free the output for the next run. If storage is down, the lease simply expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._record is not None and self._generations()[-1:] == [self.generation]:
                self._write(released=True)
        except (StorageError, OSError) as exc:
            log.warning("lease not released (%s); the next run takes it over after %.0f s", first_line(exc), self.ttl_s)

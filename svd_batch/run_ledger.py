"""A run's footprint in its output's metadata: the lease that keeps two runs of one output
apart, the part files its rows are committed to, and its record, written as it starts and
again as it ends (ledger.py says what these mean to every reader)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from svd_batch.errors import JobError
from svd_batch.ledger import Lease, LeaseHeld, close_lost, repair, write_record
from svd_batch.metadata import MetadataWriter
from svd_batch.preflight import new_record
from svd_batch.run_shards import delete_orphans
from svd_batch.schema import JobSpec, RunRecord
from svd_batch.storage import StorageError, open_storage

log = logging.getLogger(__name__)


class RunLedger:
    def __init__(self, spec: JobSpec, run_id: str, on_lost: Callable[[str], Any]) -> None:
        """`on_lost(reason)`: the lease was lost to another run (this one must drain)."""
        self.spec, self.run_id = spec, run_id
        self.output, self.meta, self.runs = (open_storage(u) for u in (spec.output, spec.metadata_uri, spec.runs_uri))
        self.writer = MetadataWriter(self.meta, run_id, flush_seconds=spec.commit_every_s)
        self.lease = Lease(self.meta, run_id, spec.lease_ttl_s, on_lost=on_lost)
        self.record: RunRecord | None = None

    def check(self) -> None:
        """Both stores answer and can be written (exit 2 otherwise)."""
        try:
            self.output.check()
            self.meta.check()
        except StorageError as exc:
            raise JobError(str(exc)) from None

    def open(self, weights: str) -> None:
        """Take the lease, repair what a dead run left (its merge half-done, its orphan shards),
        write this run's record, and close the record of a run whose lease this one took."""
        try:
            taken_over = self.lease.acquire()
        except (LeaseHeld, StorageError) as exc:
            raise JobError(f"output {self.spec.output}: {exc}") from None
        if taken_over:
            log.warning("%s", taken_over)
        self.record = new_record(self.spec, self.run_id, weights)
        try:
            repair(self.meta)
            if self.spec.shards is not None:
                delete_orphans(self.output, self.meta)
            write_record(self.runs, self.record)
            if self.lease.taken_from is not None:
                close_lost(self.runs, self.lease.taken_from)
        except StorageError as exc:
            self.lease.release()
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None

    def close(self, ending: Callable[[], dict[str, Any]]) -> None:
        """Commit what is buffered, then write the record with what `ending()` says of the run
        (its state, exit code, counts, ...), even when the commit failed."""
        if self.record is None:
            return
        try:
            self.writer.close()
            if self.spec.shards is not None:
                delete_orphans(self.output, self.meta)
        except StorageError as exc:
            raise JobError(f"metadata {self.spec.metadata_uri}: {exc}") from None
        finally:
            self.record = self.record.model_copy(update=ending())
            try:
                write_record(self.runs, self.record)
            except StorageError as exc:
                log.warning("run record not written: %s", exc)

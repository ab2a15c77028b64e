"""A run as others see it while it goes: the progress callback (the CLI's bar), `_status.json`
beside the metadata every few seconds (what `svd-batch status` reads), the metrics' rows left
and ETA, and the summary that the status file and the webhook share."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from svd_batch.accounting import Accounting
from svd_batch.errors import EXIT_CANNOT_START
from svd_batch.eta import Throughput
from svd_batch.limits import Limits
from svd_batch.metrics import DriverMetrics
from svd_batch.run_ledger import RunLedger
from svd_batch.schema import Status
from svd_batch.storage import StorageError

log = logging.getLogger(__name__)


class RunStatus:
    def __init__(
        self,
        ledger: RunLedger,
        tally: Accounting,
        limits: Limits,
        progress: Callable[[Counter[str], int], None],
        every_s: float,
    ) -> None:
        self.ledger, self.tally, self.limits, self.progress, self.every_s = ledger, tally, limits, progress, every_s
        self.throughput = Throughput()  # videos this run made, over the last minutes
        self.metrics: DriverMetrics | None = None  # once connected to Ray
        self._started = time.monotonic()
        self._last = 0.0

    def summary(self, error: str | None = None) -> dict[str, Any]:
        """The run as the webhook and `_status.json` show it: its record, what it left, and its
        failures by class (retryable ones come back on a plain rerun). `error`: why it broke off."""
        spec, record = self.ledger.spec, self.ledger.record
        head = record.model_dump(mode="json") if record else {"job": spec.name, "run_id": self.ledger.run_id}
        if error is not None:  # it could not start (no record, or one still "running"), or broke off
            head.update(state="failed", exit_code=EXIT_CANNOT_START)
        tally = self.tally
        failures = [
            {"stage": stage, "type": kind, "retryable": retryable, "rows": n}
            for (stage, kind, retryable), n in tally.failures.most_common()
        ]
        remaining = max(tally.total - sum(tally.counts.values()), 0)
        return {
            **head,
            "counts": dict(tally.counts),
            "total": tally.total,
            "remaining": remaining,  # planned, not ended yet
            **self.throughput.forecast(remaining, self.limits.seconds_left()),
            "limit": self.limits.limit[1] if self.limits.limit else None,
            "error": error,
            "failures": failures,
            "output": spec.output,
            "metadata": spec.metadata_uri,
        }

    def report(self, force: bool = False) -> None:
        """Tell the progress callback; every `every_s` seconds (or when forced), the status file
        and the metrics too."""
        now = time.monotonic()
        counts = self.tally.counts
        self.throughput.add(now, sum(counts[status.value] for status in Status))  # made by this run
        self.progress(counts, self.tally.total)
        if not force and now - self._last < self.every_s:
            return
        self._last = now
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
            self.ledger.meta.put_bytes(json.dumps(document, indent=2).encode(), "_status.json")
        except StorageError as exc:  # a progress note: never worth stopping the job for
            log.warning("status not written: %s", exc)

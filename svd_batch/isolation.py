"""How a worker keeps one bad row from costing the others their videos: a watchdog that ends
the worker when a call outlives `workers.row_timeout_s` (the only way to stop a stuck pipeline
call; Ray restarts it), and the refusal of a row that timed out alone or killed its worker
`workers.max_attempts` times (RayWorker renders a batch with such rows one row per call)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from svd_batch.control import History
from svd_batch.preparing import tries
from svd_batch.schema import WorkersSpec, WorkItem


def refusal(past: History, workers: WorkersSpec) -> tuple[str, str] | None:
    """(error type, reason) when the row is not to be tried again in this run."""
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
def watchdog(
    tell: Callable[..., Any], items: list[WorkItem], slot: int, row_timeout_s: float
) -> Iterator[Callable[[], None]]:
    """Yields what a call does when it first holds the device: start its clock (its time
    counts from then, not while it waits behind the other slot's render), and tell the
    JobControl (`tell(method, ...)`), which charges a death to the call on the device."""
    rows = len(items)

    def expire() -> None:
        if rows == 1:  # alone: the row itself is too slow (with batch-mates: find out one by one)
            tell("timed_out", slot=slot)
        print(f"svd-batch: a call of {rows} row(s) outlived workers.row_timeout_s; restarting", flush=True)
        os._exit(1)

    # row_timeout_s is per render: a gated row may take max_tries of them.
    timer = threading.Timer(row_timeout_s * sum(map(tries, items)), expire)
    timer.daemon = True

    def on_device() -> None:
        timer.start()
        tell("device_taken", os.getpid(), slot=slot)

    try:
        yield on_device
    finally:
        timer.cancel()

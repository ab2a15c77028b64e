"""A worker's use of its device and of the CPU beside it: how busy the device is, the CPU
seconds of each stage, and the frames that wait for the CPU.

A device is busy while it computes: inside pipeline calls and the image-encoder calls that
consistency needs, nothing else. Scoring, encoding and uploading run beside it (worker.py),
so time spent on them shows here as busy only where it overlaps a device call, and as idle
where the device waited for it.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from svd_batch.errors import first_line

log = logging.getLogger(__name__)


class DeviceClock:
    """`busy`: seconds inside device calls over the span from the first call's start to the
    last call's end. Gaps between calls count (the device waited for the CPU, or for work);
    the CPU work after the last call does not (there is nothing left for the device to do)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.first: float | None = None
        self.last = 0.0
        self.busy_s = 0.0
        self._lock = threading.Lock()

    @contextmanager
    def computing(self) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            ended = self.clock()
            with self._lock:
                self.first = started if self.first is None else self.first
                self.last, self.busy_s = max(self.last, ended), self.busy_s + ended - started

    @property
    def busy(self) -> float | None:
        if self.first is None:
            return None
        return min(self.busy_s / max(self.last - self.first, 1e-9), 1.0)


class FrameMeter:
    """Bytes of rendered frames the worker holds until their rows are written, and the peak:
    the bound on how far the device may run ahead of the CPU, counted. (A gated row's best
    try so far, kept while its next try renders, is not counted.)"""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            self.held += nbytes
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._lock:
                self.held -= nbytes


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


class CpuClock:
    """CPU seconds by stage, as the thread that runs it spends them (with OpenCV on one thread,
    see RowWorker), not wall time, which on a busy host counts the waiting too. A stage that
    runs child processes (ffmpeg) adds theirs; only one thread at a time may run such a stage,
    as the operating system counts children per process."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.videos = 0  # made (ok or rejected): what the seconds are per
        self._children = threading.Lock()
        self._lock = threading.Lock()

    def made(self) -> None:
        with self._lock:
            self.videos += 1

    @contextmanager
    def stage(self, name: str, children: bool = False) -> Iterator[None]:
        with self._children if children else nullcontext():
            thread, child = time.thread_time(), _children_cpu_s() if children else 0.0
            try:
                yield
            finally:
                spent = time.thread_time() - thread + (_children_cpu_s() - child if children else 0.0)
                with self._lock:
                    self.seconds[name] += spent


CPU_STAGES = ("score", "encode", "upload")  # a made video's CPU work beside its device


def run_figures(control: Any) -> dict[str, Any]:
    """The run record's device_busy, frames_peak_mb and cpu_s_per_video, from each worker
    process's figures as the run's control actor collected them (none before Ray)."""
    if control is None:
        return {}
    import ray

    try:
        figures: list[dict[str, float]] = ray.get(control.device_figures.remote())
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

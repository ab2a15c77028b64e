"""Ray metrics: a run's videos, stage times, device use, rows left and ETA, in Prometheus.

They are `ray.util.metrics`, so Ray's own exporter serves them on each node's metrics port
(`ray start --metrics-export-port`), beside Ray's metrics, and an existing Prometheus and
Grafana pick them up with no new server. Ray prefixes every application metric with `ray_`
and gives a counter the `_total` suffix: `svd_batch_videos` is scraped as
`ray_svd_batch_videos_total`. `cluster/grafana/svd-batch.json` uses those names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from svd_batch.schema import ResultRow

# The stages of a render, as the row's `<stage>_s` columns time them.
STAGES = ("denoise", "decode", "score", "encode", "upload")
# Seconds: from the tiny model's tenths of a second to a full-size SVD-XT render on CPU.
BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000]


class DriverMetrics:
    """What the driver knows: the videos its run ended, the rows left and the ETA."""

    def __init__(self, job: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"job": job}
        self.videos = Counter("svd_batch_videos", "Videos a run ended, by status.", tag_keys=("job", "status"))
        self.videos.set_default_tags(tags)
        self.left = Gauge("svd_batch_rows_left", "Videos planned and not ended yet.", tag_keys=("job",))
        self.left.set_default_tags(tags)
        self.eta = Gauge("svd_batch_eta_seconds", "When the run ends at its rate of the last minutes.", ("job",))
        self.eta.set_default_tags(tags)

    def ended(self, statuses: Mapping[str, int]) -> None:
        """`statuses`: how many videos ended with each."""
        for status, count in statuses.items():
            self.videos.inc(count, tags={"status": status})

    def progress(self, left: int, eta_s: float | None) -> None:
        self.left.set(left)
        if eta_s is not None:  # none made lately: the last ETA stays rather than a made-up one
            self.eta.set(eta_s)


class WorkerMetrics:
    """What a worker knows: each stage's time per video, how busy its device is, its restarts."""

    def __init__(self, job: str, worker: str, restarted: bool) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.seconds = Histogram(
            "svd_batch_render_seconds", "Seconds a video spent in a stage.", BOUNDARIES, tag_keys=("job", "stage")
        )
        self.seconds.set_default_tags({"job": job})
        self.busy = Gauge(
            "svd_batch_device_busy_ratio",
            "Share of a worker's wall time since its first call that its device spent computing.",
            tag_keys=("job", "worker"),
        )
        self.busy.set_default_tags({"job": job, "worker": worker})
        if restarted:  # Ray's counters count from their first increment: no series until a restart
            restarts = Counter("svd_batch_worker_restarts", "Workers Ray restarted after a death.", tag_keys=("job",))
            restarts.inc(1, tags={"job": job})

    def call(self, rows: Iterable[ResultRow], busy: float | None) -> None:
        """`busy`: the worker's DeviceClock.busy (device.py)."""
        if busy is not None:
            self.busy.set(busy)
        for row in rows:
            for stage in STAGES:
                value: Any = getattr(row, f"{stage}_s")
                if value is not None:
                    self.seconds.observe(value, tags={"stage": stage})

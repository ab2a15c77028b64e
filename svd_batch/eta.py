"""How fast a run goes now, when it will end, and what a time limit will leave.

The rate is measured over the last few minutes, not since the start: a run's first minutes
are model loads and MindSpore's slow first calls, and a night's rate changes when a node
dies. Totals grow while planning streams, so until planning ends the ETA is a lower bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

WINDOW_S = 300.0


class Throughput:
    """Videos finished per second over the last `window_s` seconds of (time, finished) samples."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, finished: int) -> None:
        self.samples.append((now, finished))
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def per_s(self) -> float | None:
        if len(self.samples) < 2 or self.samples[-1][0] <= self.samples[0][0]:
            return None
        (start, before), (end, after) = self.samples[0], self.samples[-1]
        return (after - before) / (end - start)

    def forecast(self, remaining: int, limit_in_s: float | None = None) -> dict[str, Any]:
        """`eta_s` to finish the `remaining` videos at this rate, and, for a run with a time
        limit `limit_in_s` away, how many it will leave then (None until there is a rate)."""
        rate = self.per_s()
        eta = 0.0 if remaining <= 0 else (remaining / rate if rate else None)  # none made lately: no ETA
        left = None
        if limit_in_s is not None and (rate is not None or remaining <= 0):
            left = max(0, remaining - int((rate or 0.0) * max(limit_in_s, 0.0)))
        return {"videos_per_s": rate, "eta_s": eta, "left_at_limit": left}


def duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(summary: Mapping[str, Any]) -> str:
    """A run's counts, rate, ETA and time-limit verdict, from its summary (Job.summary, which
    `_status.json` holds): one line for `run`'s progress bar and `status`."""
    counts = summary["counts"]
    parts = [f"{name} {counts.get(name, 0):,}" for name in ("ok", "failed", "skipped")]
    parts += [f"{name} {counts[name]:,}" for name in ("rejected", "left") if counts.get(name)]
    rate, eta, left, limit = (summary.get(k) for k in ("videos_per_s", "eta_s", "left_at_limit", "limit"))
    parts.append(f"{rate * 60:.1f} videos/min" if rate is not None else "- videos/min")
    parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA -")
    if limit and left is not None:
        parts.append(f"at this rate {left:,} videos will be left at {limit}" if left else f"ends before {limit}")
    return "  ".join(parts)

"""The rate over the last minutes, the ETA, and what a time limit leaves, on made-up clocks."""

from __future__ import annotations

import pytest

from svd_batch.eta import Throughput, duration, progress_line


def test_the_rate_is_the_last_minutes_not_the_whole_run() -> None:
    rate = Throughput(window_s=300)
    assert rate.per_s() is None and rate.forecast(10)["eta_s"] is None  # no rate yet: no ETA
    rate.add(0, 0)
    for minute in range(1, 11):  # 10 videos a minute at first (a slow start: loads, first calls)
        rate.add(60 * minute, 10 * minute)
    for minute in range(11, 21):  # then 60 a minute
        rate.add(60 * minute, 100 + 60 * (minute - 10))
    assert rate.per_s() == pytest.approx(1.0)  # the last 5 minutes only, not the run's average
    forecast = rate.forecast(600)
    assert forecast == {"videos_per_s": pytest.approx(1.0), "eta_s": pytest.approx(600), "left_at_limit": None}


def test_a_time_limit_says_what_it_will_leave_at_this_rate() -> None:
    rate = Throughput()
    rate.add(0, 0)
    rate.add(100, 50)  # 0.5 videos/s
    assert rate.forecast(3000, limit_in_s=3520)["left_at_limit"] == 1240
    assert rate.forecast(100, limit_in_s=3520)["left_at_limit"] == 0
    assert rate.forecast(0, limit_in_s=10) == {"videos_per_s": 0.5, "eta_s": 0.0, "left_at_limit": 0}
    rate.add(400, 50)  # nothing made for 5 minutes (a stall): no ETA, and all of it left at the limit
    assert rate.forecast(3000, limit_in_s=3520) == {"videos_per_s": 0.0, "eta_s": None, "left_at_limit": 3000}


def test_the_progress_line_reads_as_an_operator_would_say_it() -> None:
    summary = {
        "counts": {"ok": 1500, "failed": 3, "skipped": 2, "left": 0},
        "videos_per_s": 0.5,
        "eta_s": 6000.4,
        "left_at_limit": 1240,
        "limit": "06:30 CET",
    }
    assert progress_line(summary) == (
        "ok 1,500  failed 3  skipped 2  30.0 videos/min  ETA 1:40:00  "
        "at this rate 1,240 videos will be left at 06:30 CET"
    )
    assert progress_line({**summary, "left_at_limit": 0}).endswith("ETA 1:40:00  ends before 06:30 CET")
    starting = {"counts": {"ok": 0}, "videos_per_s": None, "eta_s": None, "left_at_limit": None, "limit": "the 8h"}
    assert progress_line(starting) == "ok 0  failed 0  skipped 0  - videos/min  ETA -"
    assert duration(90061) == "25:01:01"

"""A run's time limits: a deadline on the wall clock of a named zone, a maximum duration, and
the signals that stop it. Each, when it comes, drains the run with its reason; the earliest
limit is what progress and the forecast name.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import threading
import time
import zoneinfo
from collections.abc import Callable

DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class Limits:
    """`drain(reason)` stops the run, answering whether that reason was the first to."""

    def __init__(self, deadline: dt.datetime | None, max_duration: float | None, drain: Callable[[str], bool]) -> None:
        self.deadline, self.max_duration, self._drain = deadline, max_duration, drain
        self.limit: tuple[float, str] | None = None  # the earliest: (monotonic time, its name)
        self.out_of_time = False  # stopped first by a time limit (not a signal or a lost lease)
        self._timers: list[threading.Timer] = []

    def arm(self) -> None:
        """Start a timer per limit; a limit already due drains at once, before any row is taken
        (a timer thread might start late)."""
        limits = []  # (seconds from now, why the run stops then, what the forecast calls it)
        if self.deadline is not None:
            # Both in UTC: Python subtracts two times of one zone on the wall clock, DST and all.
            seconds = (self.deadline.astimezone(dt.UTC) - dt.datetime.now(dt.UTC)).total_seconds()
            limits.append(
                (seconds, f"stopped at deadline {deadline_label(self.deadline)}", f"{self.deadline:%H:%M %Z}")
            )
        if self.max_duration is not None:
            limit = f"the {format_duration(self.max_duration)} limit"
            limits.append((self.max_duration, f"stopped at {limit}", limit))
        if limits:
            seconds, _, name = min(limits)
            self.limit = (time.monotonic() + seconds, name)
        for seconds, reason, _ in limits:
            if seconds <= 0:
                self._time_up(reason)
                continue
            timer = threading.Timer(seconds, self._time_up, args=(reason,))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def catch_signals(self) -> None:
        """SIGTERM and Ctrl-C drain the run; a second one ends the process at once."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def seconds_left(self) -> float | None:
        return self.limit[0] - time.monotonic() if self.limit else None

    def _time_up(self, reason: str) -> None:
        if self._drain(reason):
            self.out_of_time = True

    def _on_signal(self, signum: int, frame: object) -> None:
        self._drain(f"stopped by {signal.Signals(signum).name}")
        signal.signal(signum, signal.SIG_DFL)


def next_deadline(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """When to stop taking rows, as an aware time in the zone it was given in.

    `HH:MM` is the next time the wall clock shows it: in the driver's local time zone, or in
    `HH:MM@Area/City`'s zone; an ISO time must carry its UTC offset. Days are counted on the
    wall clock and only then turned into an instant, so a night that crosses a DST change
    still ends at 06:30 on the clock (its timer then runs on the monotonic clock: no drift).
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    clock, at, zone_name = text.strip().partition("@")
    if not at and "T" in clock:
        return _iso_deadline(text, now)
    try:
        hour, minute = (int(part) for part in clock.split(":"))
        wall = dt.time(hour, minute)
    except ValueError:
        raise ValueError(
            f"deadline {text!r} is not HH:MM, HH:MM@Area/City or an ISO time with its offset; "
            "e.g. 06:30, 06:30@Europe/Berlin or 2026-12-04T06:30+01:00"
        ) from None
    if at:
        try:
            zone: dt.tzinfo | None = zoneinfo.ZoneInfo(zone_name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"deadline {text!r}: unknown time zone {zone_name!r}; use an IANA name such as Europe/Berlin"
            ) from None
        today = now.astimezone(zone).date()
    else:
        zone, today = None, now.astimezone().date()  # None: the system's local rules, DST included
    for day in (today, today + dt.timedelta(days=1)):
        naive = dt.datetime.combine(day, wall)
        target = naive.replace(tzinfo=zone) if zone else naive.astimezone()
        if target > now:
            return target
    raise AssertionError("unreachable: tomorrow's wall time is after now")


def _iso_deadline(text: str, now: dt.datetime) -> dt.datetime:
    try:
        target = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"deadline {text!r} is not an ISO time, e.g. 2026-12-04T06:30+01:00") from None
    if target.tzinfo is None:
        raise ValueError(f"deadline {text!r} has no UTC offset; add one (e.g. +01:00 or Z), or use HH:MM@Area/City")
    if target <= now:
        raise ValueError(f"deadline {text!r} has passed; give a time to come")
    return target


def deadline_label(deadline: dt.datetime) -> str:
    """A deadline as its zone shows it, and in UTC (what a log on another machine compares)."""
    zone = getattr(deadline.tzinfo, "key", None) or deadline.tzname()
    return f"{deadline:%Y-%m-%d %H:%M} {zone} ({deadline.astimezone(dt.UTC):%H:%M} UTC)"


def parse_duration(text: str) -> float:
    match = DURATION.match(text.strip())
    if not text.strip() or not match:
        raise ValueError(f"duration {text!r} is not like 8h, 90m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v) or "0s"

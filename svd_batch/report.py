"""One self-contained HTML page that says what a job made: counts, failures, timings, posters.

Everything is inline (CSS, SVG plots, JPEG poster frames as data URIs), so the file can be
mailed, attached to a ticket or opened from object storage without anything beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from svd_batch.ledger import latest, run_history
from svd_batch.metadata import read_table
from svd_batch.schema import Status, runs_location
from svd_batch.scores import UNITS
from svd_batch.storage import local_path, open_storage, read_uri

TIMINGS = ("denoise_s", "decode_s", "encode_s", "upload_s")
# Headless Chromium on a machine with no network and no screen, as the report's test and its
# pictures (docs/screenshots.py) open it: without the network flags it retries closed hosts.
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
MAX_POSTERS = 500
EXTREMES = 8  # posters at each end of the chosen score
SHORT_RUN_S = 300  # a run shorter than this plots its videos per 10 s, a longer one per minute
TIME_STEPS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600)  # a time axis's ticks, seconds apart
LANE_LABELS = 260  # the width of a worker lane's label

STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.counts td{font-size:20px;text-align:right}.ok{color:#186a3b}.failed{color:#a01818}
.plots{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}
svg text{font-size:10px;fill:#444}svg .axis line,svg .axis path{stroke:#888}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,272px);gap:8px}
.card{display:block;font-size:11px;text-decoration:none;color:#333;word-break:break-all}
.card .frames{display:flex;gap:4px}.card .frame{position:relative;width:128px;height:128px}
.card img,.card video{width:128px;height:128px;object-fit:contain;border:1px solid #bbb;background:#000}
.card video{position:absolute;left:0;top:0;visibility:hidden}.card.playing video{visibility:visible}
.timeline circle{fill:#3b6ea5}.lane rect.busy{fill:#3b6ea5}.lane rect.idle{fill:#e3e3e3}
details{margin:4px 0}code{font-size:12px}
"""

# A card plays its clip while the pointer is on it; a click follows the link to the clip.
SCRIPT = """
for (const card of document.querySelectorAll('.card')) {
  const clip = card.querySelector('video');
  if (!clip) continue;
  card.addEventListener('mouseenter', () => { card.classList.add('playing'); clip.play(); });
  card.addEventListener('mouseleave', () => { card.classList.remove('playing'); clip.pause(); });
}
"""


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart), at most about `most`, within [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def count_ticks(top: int) -> list[tuple[float, str]]:
    """Whole-number ticks of a count axis from 0 to `top`, as (fraction of the axis, label)."""
    return [(t / top, f"{t:.0f}") for t in nice_ticks(0, top, 4) if t == int(t)]


@dataclass(frozen=True)
class Frame:
    """A plot's area inside its SVG, with room left and below for ticks and axis labels."""

    width: int
    height: int
    left: int = 40
    right: int = 28
    top: int = 8
    bottom: int = 32

    def x(self, fraction: float) -> float:
        return self.left + fraction * (self.width - self.left - self.right)

    def y(self, fraction: float) -> float:
        return self.height - self.bottom - fraction * (self.height - self.top - self.bottom)

    def axes(self, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]], xlabel: str, ylabel: str) -> str:
        """Both axes with their ticks, each tick a (fraction of the axis, label); an empty
        `yticks` and `ylabel` draw the x axis alone."""
        x0, y0 = self.x(0), self.y(0)
        parts = [f"<line x1='{x0}' y1='{y0}' x2='{self.x(1)}' y2='{y0}'/>"]
        for f, label in xticks:
            x = self.x(f)
            parts.append(f"<line class='tick' x1='{x:.1f}' y1='{y0}' x2='{x:.1f}' y2='{y0 + 4}'/>")
            parts.append(f"<text x='{x:.1f}' y='{y0 + 14}' text-anchor='middle'>{html.escape(label)}</text>")
        middle = (self.x(0) + self.x(1)) / 2
        parts.append(f"<text class='x-label' x='{middle:.1f}' y='{self.height - 3}' text-anchor='middle'>")
        parts.append(f"{html.escape(xlabel)}</text>")
        if yticks:
            parts.append(f"<line x1='{x0}' y1='{y0}' x2='{x0}' y2='{self.y(1)}'/>")
        for f, label in yticks:
            y = self.y(f)
            parts.append(f"<line class='tick' x1='{x0 - 4}' y1='{y:.1f}' x2='{x0}' y2='{y:.1f}'/>")
            parts.append(f"<text x='{x0 - 6}' y='{y + 3:.1f}' text-anchor='end'>{html.escape(label)}</text>")
        if ylabel:
            y = (self.y(0) + self.y(1)) / 2
            parts.append(f"<text class='y-label' transform='translate(10 {y:.1f}) rotate(-90)' text-anchor='middle'>")
            parts.append(f"{html.escape(ylabel)}</text>")
        return f"<g class='axis'>{''.join(parts)}</g>"


def histogram_svg(
    values: np.ndarray, title: str, unit: str = "s", bins: int = 20, width: int = 320, height: int = 160
) -> str:
    values = values[np.isfinite(values)]
    if not len(values):
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    counts, edges = np.histogram(values, bins=bins)
    frame, top = Frame(width, height), max(int(counts.max()), 1)
    rects = "".join(
        f"<rect x='{frame.x(i / bins):.1f}' y='{frame.y(c / top):.1f}' "
        f"width='{frame.x((i + 1) / bins) - frame.x(i / bins) - 1:.1f}' height='{frame.y(0) - frame.y(c / top):.1f}' "
        f"fill='#3b6ea5'><title>{edges[i]:.3g}-{edges[i + 1]:.3g} {unit}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    low, high = edges[0], edges[-1]
    xticks = [((t - low) / (high - low), f"{t:.3g}") for t in nice_ticks(low, high, 5)]
    axes = frame.axes(xticks, count_ticks(top), f"{title} ({unit})", "videos")
    median, p95 = np.median(values), np.percentile(values, 95)
    caption = f"{title}: median {median:.3g} {unit}, p95 {p95:.3g} {unit}, n={len(values)}"
    return (
        f"<figure><svg width='{width}' height='{height}' role='img' aria-label='{html.escape(title)}'>{rects}{axes}"
        f"</svg><figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def thumbnail(image: Image.Image) -> str:
    """A small JPEG data URI."""
    image = image.convert("RGB")
    image.thumbnail((128, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def input_thumbnail(row: pd.Series) -> str | None:
    """The row's input image, as a small JPEG data URI (None if it cannot be read now)."""
    try:
        return thumbnail(Image.open(io.BytesIO(read_uri(row.image))))
    except Exception:  # moved or deleted since the run: the card shows the video alone
        return None


def poster(row: pd.Series) -> str | None:
    """The first frame of the row's video as a small JPEG data URI."""
    import imageio.v2 as imageio

    for fmt in ("mp4", "webp", "gif"):
        uri = row.get(f"{fmt}_uri")
        if isinstance(uri, str):
            with tempfile.NamedTemporaryFile(suffix=f".{fmt}") as local:
                # ffmpeg reads files, not buffers; videos in object storage are fetched first
                local.write(read_uri(uri))
                local.flush()
                frame = imageio.get_reader(local.name).get_data(0)
            break
    else:
        uri = row.get("png_uri")
        if not isinstance(uri, str):
            return None
        frame = np.asarray(Image.open(io.BytesIO(read_uri(uri + "00000.png"))))
    return thumbnail(Image.fromarray(np.asarray(frame)[..., :3]))


def time_ticks(start: pd.Timestamp, seconds: float) -> list[tuple[float, str]]:
    """Clock-time ticks on round steps (10 s to 6 h) across `seconds` from `start`."""
    step = next((t for t in TIME_STEPS if seconds / t <= 6), TIME_STEPS[-1])
    first = start.ceil(f"{step}s")
    shape = "%H:%M:%S" if step < 60 else "%H:%M"
    ticks = pd.date_range(first, start + pd.Timedelta(seconds=seconds), freq=f"{step}s")
    return [((t - start).total_seconds() / max(seconds, 1e-9), f"{t:{shape}}") for t in ticks]


def timeline_svg(ended: pd.Series, width: int = 640, height: int = 180) -> str:
    """Videos ended per minute, or per 10 s in a run shorter than SHORT_RUN_S (a minute's run
    would be one point): a point per bin from the first to the last, idle ones at 0."""
    times = pd.to_datetime(ended, utc=True)
    short = (times.max() - times.min()).total_seconds() < SHORT_RUN_S
    seconds, per = (10, "10 s") if short else (60, "minute")
    bins = times.dt.floor(f"{seconds}s")
    span = pd.date_range(bins.min(), bins.max(), freq=f"{seconds}s")
    counts = bins.value_counts().reindex(span, fill_value=0)
    frame, top = Frame(width, height), max(int(counts.max()), 1)
    domain = len(span) * seconds  # the bins' whole width; each point at its bin's middle
    points = [(frame.x((i + 0.5) / len(span)), frame.y(c / top), t, c) for i, (t, c) in enumerate(counts.items())]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
    dots = "".join(
        f"<circle class='bin' cx='{x:.1f}' cy='{y:.1f}' r='3'><title>{t:%H:%M:%S} UTC: {c} videos</title></circle>"
        for x, y, t, c in points
    )
    axes = frame.axes(time_ticks(span[0], domain), count_ticks(top), "time (UTC)", f"videos per {per}")
    caption = (
        f"videos per {per}, {span[0]:%H:%M:%S}–{span[-1] + pd.Timedelta(seconds=seconds):%H:%M:%S} UTC: "
        f"{len(span)} bins, at most {top} in one"
    )
    return (
        f"<figure class='timeline'><svg width='{width}' height='{height}' role='img' aria-label='videos per {per}'>"
        f"<polyline points='{line}' fill='none' stroke='#3b6ea5'/>{dots}{axes}</svg>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def lanes_svg(rows: pd.DataFrame, width: int = 640, lane: int = 22) -> str:
    """One lane per worker across the run: when its device computed (blue) and when it was idle
    (grey), from each row's last device call; rows written before those were recorded show
    their whole time in the worker instead."""
    rows = rows.copy()
    rows["busy_from"] = rows.device_started_at.fillna(rows.started_at)
    rows["busy_to"] = rows.device_ended_at.fillna(rows.ended_at)
    timed = rows.dropna(subset=["worker", "busy_from", "busy_to"])
    start, end = timed.busy_from.min(), timed.busy_to.max()
    total = max((end - start).total_seconds(), 1e-3)
    workers = sorted(timed.groupby("worker"), key=lambda item: item[0])
    frame = Frame(width, len(workers) * lane + 34, left=LANE_LABELS, top=0)
    lanes = []
    for n, (worker, group) in enumerate(workers):
        merged: list[list[float]] = []  # a batch's rows overlap: their union is the busy time
        for a, b in sorted(zip(group.busy_from, group.busy_to, strict=True)):
            a_s, b_s = (a - start).total_seconds(), (b - start).total_seconds()
            if merged and a_s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b_s)
            else:
                merged.append([a_s, b_s])
        busy = sum(b - a for a, b in merged)
        y = n * lane
        bars = "".join(
            f"<rect class='busy' x='{frame.x(a / total):.1f}' y='{y + 3}' "
            f"width='{max(frame.x(b / total) - frame.x(a / total), 1):.1f}' "
            f"height='{lane - 6}'><title>{a:.0f}–{b:.0f} s</title></rect>"
            for a, b in merged
        )
        node = group.node.dropna().iloc[0] if group.node.notna().any() else "?"
        lanes.append(
            f"<g class='lane' data-worker='{html.escape(str(worker))}'><text x='0' y='{y + lane - 7}' font-size='11'>"
            f"{html.escape(str(worker))}: busy {busy / total:.0%}<title>node {html.escape(node)}</title></text>"
            f"<rect class='idle' x='{frame.x(0)}' y='{y + 3}' width='{frame.x(1) - frame.x(0)}' "
            f"height='{lane - 6}'/>{bars}</g>"
        )
    ticks = [(t / total, f"{t:g}") for t in nice_ticks(0, total, 6)]
    axis = frame.axes(ticks, [], f"seconds from {start:%H:%M:%S} UTC", "")
    return (
        f"<figure><svg class='lanes' width='{width}' height='{frame.height}' role='img' "
        f"aria-label='busy and idle time per worker'>{''.join(lanes)}{axis}</svg><figcaption>"
        f"{len(lanes)} workers over {total:.0f} s, from {start:%H:%M:%S} UTC</figcaption></figure>"
    )


def _night(table: pd.DataFrame) -> list[str]:
    """The latest run that made anything: its videos per minute, and each worker's lane."""
    made = table[table.ended_at.notna() & table.worker.notna()]
    if not len(made):
        return []
    run = made.run_id.max()
    rows = made[made.run_id == run]
    return [f"<h2>Run {html.escape(run)}</h2>", timeline_svg(rows.ended_at), lanes_svg(rows)]


def _video_link(row: pd.Series) -> str:
    for fmt in ("mp4", "webp", "gif", "png"):
        uri = row.get(f"{fmt}_uri")
        if isinstance(uri, str):
            return uri
    return "#"


def reachable(uri: str, at: str | None) -> str | None:
    """`uri` as a page in folder `at` can fetch it: a path relative to `at` in the same store,
    so the folder keeps working when moved or served as it is; None where a browser cannot
    reach it from there (an s3:// URI beside a local page, another bucket)."""
    if at is None:
        return None
    if uri.startswith("s3://") or at.startswith("s3://"):
        if not (uri.startswith("s3://") and at.startswith("s3://")):
            return None
        (bucket, _, key), (at_bucket, _, prefix) = (u.removeprefix("s3://").partition("/") for u in (uri, at))
        if bucket != at_bucket:
            return None
        return quote(posixpath.relpath("/" + key, "/" + prefix.rstrip("/")))
    return quote(os.path.relpath(local_path(uri), local_path(at)))


def _runs_table(metadata_uri: str) -> str:
    runs = run_history(open_storage(runs_location(metadata_uri)))
    if not runs:
        return "<p>no run records</p>"
    head = ("run", "state", "exit", "ok", "rejected", "failed", "skipped", "left", "started (UTC)", "took")
    rows = []
    for run in reversed(runs):
        took = f"{(run.ended_at - run.started_at).total_seconds():.0f} s" if run.ended_at else "-"
        cells = (run.run_id, run.state, "-" if run.exit_code is None else str(run.exit_code))
        cells += tuple(str(run.counts.get(name, 0)) for name in head[3:8])
        cells += (f"{run.started_at:%Y-%m-%d %H:%M:%S}", took)
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table class='runs'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _poster_card(row: pd.Series, label: str, at: str | None) -> str:
    """The input beside the first frame of its video, at one size, linking to the video; an
    MP4 the page can reach plays over its first frame while the pointer is on the card."""
    source, still = input_thumbnail(row), poster(row)
    frames = f"<img class='input' src='{source}' alt='{html.escape(label)} input'>" if source else ""
    if still:
        mp4 = row.get("mp4_uri")
        clip = reachable(mp4, at) if isinstance(mp4, str) else None
        video = f"<video src='{html.escape(clip)}' muted loop playsinline preload='none'></video>" if clip else ""
        first = f"<img class='video' src='{still}' alt='{html.escape(label)} video'>"
        frames += f"<span class='frame'>{first}{video}</span>"
    caption = row.get("caption")
    hover = f" title='{html.escape(caption)}'" if isinstance(caption, str) else ""  # a dataset's caption, on hover
    link = _video_link(row)
    href = html.escape(reachable(link, at) or link) if link != "#" else "#"
    frames = f"<span class='frames'>{frames}</span>"
    return f"<a class='card' href='{href}'{hover}>{frames}<span>{html.escape(label)}</span></a>"


def _scores(table: pd.DataFrame, by: str, at: str | None) -> list[str]:
    """Score histograms, rejections per gate, and the clips at both ends of the `by` score."""
    scored = table[table.status.isin([Status.ok, Status.rejected])]
    parts = ["<h2>Scores per video</h2><div class='plots'>"]
    parts += [histogram_svg(scored[f"score_{n}"].to_numpy(dtype=float), n, unit) for n, unit in UNITS.items()]
    parts.append("</div>")
    rejected = table[table.status == Status.rejected]
    if len(rejected):
        gates = Counter(gate for missed in rejected.failed_gates for gate in missed)
        cells = "".join(f"<tr><td>{html.escape(g)}</td><td>{n}</td></tr>" for g, n in gates.most_common())
        parts.append(
            f"<h2>Rejected ({len(rejected)})</h2><p>rows whose best try missed each gate</p>"
            f"<table class='gates'><tr><th>gate</th><th>rows</th></tr>{cells}</table>"
        )
    # Rejected clips count among the worst when they were kept (keep_rejected).
    has_video = scored[[f"{fmt}_uri" for fmt in ("mp4", "webp", "gif", "png")]].notna().any(axis=1)
    ranked = scored[scored[by].notna() & has_video].sort_values(by)
    if len(ranked):
        ends = (("Best", ranked.tail(EXTREMES)[::-1]), ("Worst", ranked.head(EXTREMES)))
        for end, rows in ends:
            parts.append(f"<h2>{end} by {html.escape(by)}</h2><div class='sheet'>")
            parts += [_poster_card(r, f"{r.id} #{r.video_index}: {r[by]:.3g}", at) for _, r in rows.iterrows()]
            parts.append("</div>")
    return parts


def build(metadata_uri: str, title: str | None = None, by: str = "score_motion", at: str | None = None) -> str:
    """`by`: the score whose best and worst clips the page shows; `at`: the folder the page
    will be in, from where its cards link and play their clips (None: links as URIs, stills)."""
    if by.removeprefix("score_") not in UNITS:
        raise ValueError(f"--by {by} is not a score; choose one of {', '.join('score_' + n for n in UNITS)}")
    by = "score_" + by.removeprefix("score_")
    table = latest(read_table(open_storage(metadata_uri))).to_pandas()
    counts = Counter(table.status)
    name = title or (table.job.iloc[0] if len(table) else "svd-batch")
    statuses = ("ok", "rejected", "failed") if counts.get("rejected") else ("ok", "failed")
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(name)} report</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(name)}</h1>",
        f"<p>{len(table)} outputs in {html.escape(metadata_uri)}; the latest result of each</p>",
        "<table class='counts'><tr>"
        + "".join(f"<th class='{s}'>{s}</th>" for s in statuses)
        + "</tr><tr>"
        + "".join(f"<td class='{s}'>{counts.get(s, 0)}</td>" for s in statuses)
        + "</tr></table>",
        "<h2>Runs</h2>",
        _runs_table(metadata_uri),
        *_night(table),
    ]
    failed = table[table.status == "failed"]
    parts.append(f"<h2>Failures ({len(failed)})</h2>")
    if len(failed):
        # Rows of versions before failure classes carry no stage or type.
        retry = failed.retryable.map({True: " (retryable)"}).fillna("")
        kind = failed.error_stage.fillna("unclassified") + ": " + failed.error_type.fillna("error") + retry
        for label, rows in sorted(failed.groupby(kind), key=lambda item: -len(item[1])):
            items = "".join(f"<li><code>{html.escape(str(e))}</code></li>" for e in rows.error.head(200))
            summary = f"<summary>{html.escape(label)}: {len(rows)} rows</summary>"
            # Retryable failures come back on a plain run; final ones only when asked for.
            again = "svd-batch run JOB.yaml" + ("" if rows.retryable.eq(True).all() else " --retry-failed")
            retry = f"<p class='retry'>to render them again: <code>{again}</code></p>"
            parts.append(f"<details class='failure' open>{summary}{retry}<ul>{items}</ul></details>")
    else:
        parts.append("<p>none</p>")
    ok = table[table.status == "ok"]
    parts.append("<h2>Timings per video</h2><div class='plots'>")
    parts += [histogram_svg(ok[c].to_numpy(dtype=float), c.removesuffix("_s")) for c in TIMINGS if c in ok]
    parts.append("</div>")
    parts += _scores(table, by, at)
    parts.append(f"<h2>Contact sheet ({min(len(ok), MAX_POSTERS)} of {len(ok)})</h2><div class='sheet'>")
    parts += [_poster_card(row, f"{row.id} #{row.video_index}", at) for _, row in ok.head(MAX_POSTERS).iterrows()]
    parts.append(f"</div><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write(metadata_uri: str, destination: str, title: str | None = None, by: str = "score_motion") -> str:
    """Write the page; returns where, as a path for a local file (what a user can paste)."""
    directory, _, name = destination.rpartition("/")
    page = build(metadata_uri, title, by, at=directory or ".").encode()
    written = open_storage(directory or ".").put_bytes(page, name)
    return written if written.startswith("s3://") else str(local_path(written))

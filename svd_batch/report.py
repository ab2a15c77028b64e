"""One self-contained HTML page that says what a job made: counts, failures, timings, posters.

Everything is inline (CSS, SVG plots, JPEG poster frames as data URIs), so the file can be
mailed, attached to a ticket or opened from object storage without anything beside it.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections import Counter

import numpy as np
import pandas as pd
from PIL import Image

from svd_batch.ledger import latest, run_history
from svd_batch.metadata import read_table
from svd_batch.schema import Status, runs_location
from svd_batch.scores import UNITS
from svd_batch.storage import local_path, open_storage, read_uri

TIMINGS = ("denoise_s", "decode_s", "encode_s", "upload_s")
MAX_POSTERS = 500
EXTREMES = 8  # posters at each end of the chosen score

STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.counts td{font-size:20px;text-align:right}.ok{color:#186a3b}.failed{color:#a01818}
.plots{display:flex;flex-wrap:wrap;gap:16px}.sheet{display:flex;flex-wrap:wrap;gap:8px}
.sheet a{display:block;width:268px;font-size:11px;text-decoration:none;color:#333;word-break:break-all}
.sheet img{display:inline-block;width:128px;height:auto;border:1px solid #bbb;background:#000;margin-right:4px}
.timeline circle{fill:#3b6ea5}.lane rect.busy{fill:#3b6ea5}.lane rect.idle{fill:#e3e3e3}
details{margin:4px 0}code{font-size:12px}
"""


def histogram_svg(
    values: np.ndarray, title: str, unit: str = "s", bins: int = 20, width: int = 320, height: int = 140
) -> str:
    values = values[np.isfinite(values)]
    if not len(values):
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    counts, edges = np.histogram(values, bins=bins)
    top, bar = max(int(counts.max()), 1), width / bins
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - c / top * (height - 30):.1f}" width="{bar - 1:.1f}" '
        f'height="{c / top * (height - 30):.1f}" fill="#3b6ea5"><title>{edges[i]:.3g}-{edges[i + 1]:.3g} {unit}: '
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (
        f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.3g} {unit}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:.3g} {unit}</text>'
    )
    median, p95 = np.median(values), np.percentile(values, 95)
    caption = f"{title}: median {median:.3g} {unit}, p95 {p95:.3g} {unit}, n={len(values)}"
    return (
        f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">{rects}{axis}'
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


def timeline_svg(ended: pd.Series, width: int = 640, height: int = 160) -> str:
    """Videos ended per minute, one point per minute from the first to the last (idle ones at 0)."""
    minutes = pd.to_datetime(ended, utc=True).dt.floor("min")
    span = pd.date_range(minutes.min(), minutes.max(), freq="min")
    counts = minutes.value_counts().reindex(span, fill_value=0)
    top, step = max(int(counts.max()), 1), (width - 40) / max(len(span) - 1, 1)
    points = [(20 + i * step, height - 20 - c / top * (height - 40), t, c) for i, (t, c) in enumerate(counts.items())]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
    dots = "".join(
        f"<circle class='minute' cx='{x:.1f}' cy='{y:.1f}' r='3'><title>{t:%H:%M} UTC: {c} videos</title></circle>"
        for x, y, t, c in points
    )
    caption = f"videos per minute, {span[0]:%H:%M}–{span[-1]:%H:%M} UTC: {len(span)} minutes, at most {top} a minute"
    return (
        f"<figure class='timeline'><svg width='{width}' height='{height}' role='img' aria-label='videos per minute'>"
        f"<polyline points='{line}' fill='none' stroke='#3b6ea5'/>{dots}</svg>"
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
    scale = (width - 260) / total
    lanes = []
    for n, (worker, group) in enumerate(sorted(timed.groupby("worker"), key=lambda item: item[0])):
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
            f"<rect class='busy' x='{260 + a * scale:.1f}' y='{y + 3}' width='{max((b - a) * scale, 1):.1f}' "
            f"height='{lane - 6}'><title>{a:.0f}–{b:.0f} s</title></rect>"
            for a, b in merged
        )
        node = group.node.dropna().iloc[0] if group.node.notna().any() else "?"
        lanes.append(
            f"<g class='lane' data-worker='{html.escape(str(worker))}'><text x='0' y='{y + lane - 7}' font-size='11'>"
            f"{html.escape(str(worker))}: busy {busy / total:.0%}<title>node {html.escape(node)}</title></text>"
            f"<rect class='idle' x='260' y='{y + 3}' width='{width - 260}' "
            f"height='{lane - 6}'/>{bars}</g>"
        )
    return (
        f"<figure><svg class='lanes' width='{width}' height='{len(lanes) * lane}' role='img' "
        f"aria-label='busy and idle time per worker'>{''.join(lanes)}</svg><figcaption>"
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


def _poster_card(row: pd.Series, label: str) -> str:
    """The input beside the first frame of its video, linking to the video."""
    pair = [(input_thumbnail(row), "input"), (poster(row), "video")]
    img = "".join(f"<img class='{kind}' src='{src}' alt='{html.escape(label)} {kind}'>" for src, kind in pair if src)
    caption = row.get("caption")
    hover = f" title='{html.escape(caption)}'" if isinstance(caption, str) else ""  # a dataset's caption, on hover
    return f"<a href='{html.escape(_video_link(row))}'{hover}>{img}<span>{html.escape(label)}</span></a>"


def _scores(table: pd.DataFrame, by: str) -> list[str]:
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
            parts += [_poster_card(r, f"{r.id} #{r.video_index}: {r[by]:.3g}") for _, r in rows.iterrows()]
            parts.append("</div>")
    return parts


def build(metadata_uri: str, title: str | None = None, by: str = "score_motion") -> str:
    """`by`: the score whose best and worst clips the page shows."""
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
            again = "svd-batch run JOB.yaml" + ("" if rows.retryable.fillna(False).all() else " --retry-failed")
            retry = f"<p class='retry'>to render them again: <code>{again}</code></p>"
            parts.append(f"<details class='failure' open>{summary}{retry}<ul>{items}</ul></details>")
    else:
        parts.append("<p>none</p>")
    ok = table[table.status == "ok"]
    parts.append("<h2>Timings per video</h2><div class='plots'>")
    parts += [histogram_svg(ok[c].to_numpy(dtype=float), c.removesuffix("_s")) for c in TIMINGS if c in ok]
    parts.append("</div>")
    parts += _scores(table, by)
    parts.append(f"<h2>Contact sheet ({min(len(ok), MAX_POSTERS)} of {len(ok)})</h2><div class='sheet'>")
    parts += [_poster_card(row, f"{row.id} #{row.video_index}") for _, row in ok.head(MAX_POSTERS).iterrows()]
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write(metadata_uri: str, destination: str, title: str | None = None, by: str = "score_motion") -> str:
    """Write the page; returns where, as a path for a local file (what a user can paste)."""
    page = build(metadata_uri, title, by).encode()
    directory, _, name = destination.rpartition("/")
    written = open_storage(directory or ".").put_bytes(page, name)
    return written if written.startswith("s3://") else str(local_path(written))

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
.sheet a{display:block;width:136px;font-size:11px;text-decoration:none;color:#333;word-break:break-all}
.sheet img{display:block;width:128px;height:auto;border:1px solid #bbb;background:#000}
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
    image = Image.fromarray(np.asarray(frame)[..., :3]).convert("RGB")
    image.thumbnail((128, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


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
    src = poster(row)
    img = f"<img src='{src}' alt='{html.escape(label)}'>" if src else ""
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
            parts.append(f"<details>{summary}<ul>{items}</ul></details>")
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

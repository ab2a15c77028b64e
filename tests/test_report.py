"""`svd-batch report`: one self-contained HTML file, checked in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from svd_batch.metadata import MetadataWriter
from svd_batch.report import CHROMIUM_FLAGS, build, write
from svd_batch.schema import JobSpec
from svd_batch.scores import UNITS
from svd_batch.storage import local_path, open_storage
from tests.helpers import FAST, make_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A small real output: three videos and a failure, made in-process (no Ray needed) by the
    simulated device (the page is the report's promise, not the frames), in a folder whose name
    has a space and a non-ASCII letter (file URIs percent-encode both)."""
    from svd_batch.manifest import read_rows
    from svd_batch.plan import Planner
    from svd_batch.worker import RowWorker

    folder = tmp_path_factory.mktemp("report")
    for i in range(3):
        make_image(folder / f"{i}.png", seed=i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [
        '{"id": "r0", "image": "0.png"}',
        '{"id": "r1", "image": "1.png", "caption": "a cat & a <dog>"}',
        # Gated past any clip: rejected, and kept for a look.
        '{"id": "r2", "image": "2.png", "quality": {"min_motion": 1e9, "keep_rejected": true}}',
        '{"id": "bad", "image": "broken.png"}',
    ]
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    spec = JobSpec.model_validate(
        {
            "name": "reported",
            "manifest": str(folder / "manifest.jsonl"),
            "output": str(folder / "out dir é"),
            "model": {"path": tiny_model},
            "defaults": FAST,
            "formats": ["mp4", "gif"],
            "simulate": 0.01,
        }
    )
    planner = Planner(spec, spec.manifest, "20260101T000000Z-test", "weights")
    items = [item.work_item() for n, row in read_rows(spec.manifest) for item in planner.resolve(row, n)]
    writer = MetadataWriter(open_storage(spec.metadata_uri), "20260101T000000Z-test")
    writer.add(RowWorker(spec).process(items))
    writer.close()
    return folder / "out dir é"


class Page(HTMLParser):
    """What a reader of the page gets: its visible text, its links and its pictures."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a":
            self.links.append(values["href"] or "")
        elif tag == "img":
            self.images.append(values["src"] or "")

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data.strip())


def test_report_has_counts_failures_timings_scores_and_posters(rendered: Path) -> None:
    written = build(str(rendered / "metadata"))
    page = Page(written)
    # A clip's caption shows on hover over each of its cards (best, worst, contact sheet), escaped.
    assert written.count("title='a cat &amp; a &lt;dog&gt;'>") == 3 and written.count(" title=") == 3
    text = " | ".join(page.text)
    assert "ok | rejected | failed | 2 | 1 | 1" in text  # the counts table, header then values
    # Grouped by the error_stage and error_type columns, never by parsing the message.
    assert "Failures (1)" in text and "image: ImageError: 1 rows" in text and "row 4 (id 'bad')" in text
    for stage in ("denoise", "decode", "encode", "upload"):
        assert re.search(rf"{stage}: median [0-9.e-]+ s, p95 [0-9.e-]+ s, n=2", text), stage
    for score, unit in UNITS.items():  # ok and rejected clips alike are scored
        assert re.search(rf"{score}: median [0-9.e+-]+ {unit}, p95 [0-9.e+-]+ {unit}, n=3", text), score
    assert "Rejected (1) | rows whose best try missed each gate | gate | rows | min_motion | 1" in text
    motion = results_by_id(rendered).score_motion.dropna()
    best = [t for t in page.text if re.fullmatch(r"r\d #0: [0-9.e+-]+", t)]
    by_motion = [f"{i} #0: {motion[i]:.3g}" for i in motion.sort_values(ascending=False).index]
    assert best == by_motion + by_motion[::-1]  # best first, then worst first; the kept rejected among them
    assert "Contact sheet (2 of 2)" in text and {"r0 #0", "r1 #0"} <= set(page.text)
    videos = [link for link in page.links if link.endswith(".mp4")]
    assert len(set(videos)) == 3 and all(local_path(link).stat().st_size > 0 for link in videos)
    assert len(page.images) == 2 * (3 + 3 + 2)  # the input beside a poster frame per card, inline, real pictures
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")  # self-contained: nothing fetched from elsewhere
        poster = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        assert 0 < max(poster.shape[:2]) <= 128 and poster.std() > 5  # thumbnails, not blank


def test_report_refuses_a_score_it_does_not_have(rendered: Path) -> None:
    with pytest.raises(ValueError, match="--by score_beauty is not a score; choose one of score_motion"):
        build(str(rendered / "metadata"), by="score_beauty")


def results_by_id(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "metadata").set_index("id")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by `make test` (apt-get)")
def test_report_renders_in_headless_chromium(rendered: Path, tmp_path: Path) -> None:
    target = write(str(rendered / "metadata"), str(rendered / "report.html"))
    assert Path(target) == rendered / "report.html"
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,900",
            f"--screenshot={shot}",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.std() > 10  # text, plots and posters, not a blank page
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []

    # What the browser built of it: a point per 10 s of this short run, a lane per worker, a group per failure class.
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom",
         target],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    df = pd.read_parquet(rendered / "metadata")
    night = df[df.run_id == df.run_id.max()].dropna(subset=["worker"])
    bins = night.ended_at.dt.floor("10s")
    assert dom.count('class="bin"') == (bins.max() - bins.min()) // pd.Timedelta(seconds=10) + 1
    # Every plot has both axes labelled and ticked (the timeline, 4 timings, the scores); the lanes a time axis.
    plots = 1 + 4 + len(UNITS)
    assert dom.count('class="x-label"') == plots + 1 and dom.count('class="y-label"') == plots
    assert dom.count('class="tick"') >= 2 * (2 * plots + 1)
    assert "time (UTC)" in dom and "videos per 10 s" in dom and "denoise (s)" in dom
    assert re.findall(r'class="lane" data-worker="([^"]+)"', dom) == sorted(night.worker.unique())
    failed = df[df.status == "failed"]
    groups = failed.groupby(["error_stage", "error_type"]).size()
    assert dom.count('class="failure"') == len(groups)
    for (stage, kind), n in groups.items():
        assert f"{stage}: {kind}: {n} rows" in dom and "svd-batch run JOB.yaml --retry-failed" in dom
    assert dom.count('class="input"') == dom.count('class="video"') == 3 + 3 + 2
    # Each card's clip plays from beside the page: a muted looping video at a path relative to it.
    clips = re.findall(r'<video src="([^"]+)" muted="" loop="" playsinline="" preload="none">', dom)
    assert len(clips) == 3 + 3 + 2 and all((rendered / unquote(c)).is_file() for c in clips)
    assert all(c.startswith("videos/") and c.endswith(".mp4") for c in clips)


def test_a_workers_lane_shows_its_device_calls_not_its_time_writing() -> None:
    """Two calls of one worker: on the device 0-2 s and 3-5 s, each row written 2 s later. The
    lane draws the device calls, and its busy share is theirs over the span (4 of 5 s), not
    the rows' whole time in the worker, which would cover it all."""
    from svd_batch.report import lanes_svg

    t0 = pd.Timestamp("2026-12-07T00:00:00Z")

    def at(seconds: float) -> pd.Timestamp:
        return t0 + pd.Timedelta(seconds=seconds)

    rows = pd.DataFrame(
        {
            "worker": ["w1", "w1"],
            "node": ["n", "n"],
            "started_at": [at(0), at(1)],
            "ended_at": [at(4), at(7)],
            "device_started_at": [at(0), at(3)],
            "device_ended_at": [at(2), at(5)],
        }
    )
    svg = lanes_svg(rows)
    assert "w1: busy 80%" in svg  # 4 s of device calls in the 5 s the lanes span (the rows' times: 7 s, all busy)
    assert re.findall(r"<title>(\d+)–(\d+) s</title>", svg) == [("0", "2"), ("3", "5")]

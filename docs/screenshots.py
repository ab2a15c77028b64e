"""The report's pictures in docs/img/, taken in headless Chromium from real runs (`make screenshots`).

Two pages: the report of `make demo` (out/demo), and that of an hour-long night made from the
demo's own rows (4 workers, an S3 outage of 4 minutes), each pointing at a real clip of the
demo. The night's metadata is synthetic (no hour was rendered for it); the page and its plots
are the real report's. Each shot is taken with the pointer on the first card, once its clip
plays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from playwright.sync_api import sync_playwright

from svd_batch import report
from svd_batch.metadata import read_table
from svd_batch.storage import open_storage

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "img"


def hour_of(demo: Path, folder: Path, workers: int = 4) -> Path:
    """A night of an hour from the demo's rows: the metadata folder of it, written under `folder`.

    Each worker renders one video after another (3.5-5 s on its device, 0.2-0.8 s between), the
    workers starting 20 s apart; S3 is down from 01:30 to 01:34: an upload then takes 20-30 s
    of retries and fails (retryably)."""
    table = read_table(open_storage(str(demo / "metadata")))
    made = table.to_pandas()
    made = made[made.status == "ok"].reset_index(drop=True)
    rng = np.random.default_rng(0)
    start, end = pd.Timestamp("2026-12-07T01:00:00Z"), pd.Timestamp("2026-12-07T02:00:00Z")
    down = (pd.Timestamp("2026-12-07T01:30:00Z"), pd.Timestamp("2026-12-07T01:34:00Z"))
    times: list[tuple[int, pd.Timestamp, float, float]] = []  # worker, device start, device s, write s
    for worker in range(workers):
        at = start + pd.Timedelta(seconds=20 * worker)
        while at < end:
            device = rng.uniform(3.5, 5.0)
            write = rng.uniform(20, 30) if down[0] <= at < down[1] else rng.uniform(0.2, 0.8)
            times.append((worker, at, device, write))
            at += pd.Timedelta(seconds=device + write)
    times.sort(key=lambda t: t[1])
    n = np.arange(len(times))
    night = made.iloc[n % len(made)].reset_index(drop=True)
    device = pd.to_timedelta([t[2] for t in times], unit="s")
    night["id"] = [f"scene-{i:05d}" for i in n]
    night["key"] = [f"videos/scene-{i:05d}" for i in n]
    night["worker"] = [f"worker-{t[0]}" for t in times]
    night["device_started_at"] = pd.DatetimeIndex([t[1] for t in times]).floor("us")  # the schema's unit
    night["device_ended_at"] = (night.device_started_at + device).dt.floor("us")
    night["started_at"] = night.device_started_at
    night["ended_at"] = (night.device_ended_at + pd.to_timedelta([t[3] for t in times], unit="s")).dt.floor("us")
    night["denoise_s"] = device.total_seconds() * 0.9
    night["decode_s"] = device.total_seconds() * 0.1
    night["run_id"] = "20261207T010000Z-hour00"
    night["job"] = "an hour (synthetic metadata)"
    outage = night.device_started_at.between(*down, inclusive="left")
    night.loc[outage, ["status", "error_stage", "error_type", "retryable"]] = ["failed", "upload", "StorageError", True]
    night.loc[outage, "error"] = [f"row {i} (id 'scene-{i:05d}'): upload: S3 503 after 3 tries" for i in n[outage]]
    night.loc[outage, ["mp4_uri", "gif_uri", "score_motion"]] = None
    metadata = folder / "metadata"
    metadata.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(night, schema=table.schema, preserve_index=False), metadata / "part-hour.parquet"
    )
    return metadata


def shoot(page_path: Path, image: Path) -> None:
    """The page from its top to its first row of cards, with the pointer on the first card that has a
    clip, once that clip has played a while."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=list(report.CHROMIUM_FLAGS))
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_path.as_uri())
        page.hover(".card:has(video)")
        page.wait_for_function("document.querySelector('.card.playing video').currentTime > 0.3", timeout=30_000)
        # Down to the first row of cards: the plots and a card playing (a night's whole sheet is 500 cards).
        bottom = page.evaluate(
            "(() => { const r = document.querySelector('.sheet').getBoundingClientRect();"
            " return r.top + window.scrollY + Math.min(r.height, 300); })()"
        )
        page.screenshot(
            path=str(image),
            type="jpeg",
            quality=85,
            full_page=True,
            clip={"x": 0, "y": 0, "width": 1200, "height": bottom},
        )
        browser.close()


def main() -> None:
    demo = ROOT / "out" / "demo"
    if not (demo / "metadata").is_dir():
        sys.exit("no out/demo/metadata: run `make demo` first (`make screenshots` does)")
    IMAGES.mkdir(exist_ok=True)
    hour = ROOT / "out" / "hour"
    for folder, metadata, name in (
        (demo, demo / "metadata", "report-demo.jpg"),
        (hour, hour_of(demo, hour), "report-hour.jpg"),
    ):
        page = Path(report.write(str(metadata), str(folder / "report.html")))
        shoot(page, IMAGES / name)
        print(f"{IMAGES / name} from {page}")


if __name__ == "__main__":
    main()

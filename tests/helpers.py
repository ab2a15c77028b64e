"""Helpers every test module may use: inputs, job specs, waiting for events, the faulty S3 hop.

Test modules import from here only, never from each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from chaos.world import wait_until as wait_until  # the tests wait as the chaos run does
from svd_batch.driver import Job, load_spec
from svd_batch.ledger import latest, run_history
from svd_batch.metadata import read_table
from svd_batch.schema import RunRecord
from svd_batch.storage import open_storage

# Small enough that one tiny video renders in about a second on one core.
FAST = {"height": 32, "width": 32, "num_frames": 4, "num_inference_steps": 2, "decode_chunk_size": 2}
# Seconds a video on a simulated device, for the tests of orchestration rather than of the model:
# no MindSpore import or model load per worker, and long enough to stop or kill a job mid-way.
SIMULATE = 0.5


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """A textured test image (flat colours would hide fitting and orientation bugs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy, "RGB").convert(mode).save(path)
    return path


def rows_and_images(folder: Path, n: int) -> list[dict]:
    for i in range(n):
        make_image(folder / "img" / f"{i}.png", seed=i)
    return [{"id": f"q{i}", "image": f"img/{i}.png"} for i in range(n)]


def write_job(folder: Path, rows: list[dict], model: Path, **spec: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    document = {
        "name": "t",
        "manifest": "manifest.jsonl",
        "output": "outputs",
        "model": {"path": str(model)},
        "defaults": FAST,
        "formats": ["mp4"],
        "workers": {"count": 1, "batch_size": 2},
        "seed": 3,
        **spec,
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(document))
    return folder / "job.yaml"


def results(spec_path: Path) -> pd.DataFrame:
    spec = load_spec(spec_path)
    return read_table(open_storage(spec.metadata_uri)).to_pandas()


def simulated_view(spec: Path) -> Path:
    """A job file whose output is `spec`'s simulated one, for the helpers that read a job's
    outputs through its file."""
    document = yaml.safe_load(spec.read_text())
    document["output"] = load_spec(spec, simulate=1).output
    view = spec.with_name("simulated-view.yaml")
    view.write_text(yaml.safe_dump(document))
    return view


def status_counts(spec_path: Path) -> dict[str, int]:
    """The counts of the job's live `_status.json` ({} until the driver has written one)."""
    status = Path(load_spec(spec_path).metadata_uri) / "_status.json"
    try:
        return json.loads(status.read_text())["counts"]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-replace
        return {}


def videos_match_metadata(spec_path: Path) -> bool:
    """Every file under a final key is a video the metadata calls ok, and the other way round
    (an interrupted write may leave only a hidden `.tmp-` file beside its key)."""
    df = results(spec_path)
    ok = {uri.removeprefix("file://") for uri in df[df.status == "ok"].mp4_uri}
    folder = Path(load_spec(spec_path).output) / "videos"
    return ok == {str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def latest_results(spec_path: Path) -> pd.DataFrame:
    """One row per key, the newest produced: what status, report and resume all go by."""
    spec = load_spec(spec_path)
    return latest(read_table(open_storage(spec.metadata_uri))).to_pandas()


def run_records(spec_path: Path) -> list[RunRecord]:
    return run_history(open_storage(load_spec(spec_path).runs_uri))


def run_job(spec_path: Path, **kwargs: object) -> Counter[str]:
    return Job(load_spec(spec_path), **kwargs).run()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svd_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_control(run_id: str) -> object:
    """The run's control actor (control.py), once the driver has started it; else None."""
    import ray

    from svd_batch.control import JobControl

    try:
        return ray.get_actor(JobControl.name(run_id))
    except ValueError:
        return None


def worker_pids(under: str | None = None) -> list[int]:
    """This test session's svd-batch workers: descendants of this process (its Ray cluster's
    raylet started them), never those of another suite or job running on the same machine.
    `under`: only those of the child process whose command line has it (a head it started)."""
    import psutil

    roots = [psutil.Process()]
    if under is not None:
        roots = [p for p in roots[0].children() if under in " ".join(p.cmdline())]
    found = []
    for process in (child for root in roots for child in root.children(recursive=True)):
        try:
            # Ray titles actor processes "ray::MapWorker(MapBatches(SpecRayWorker))..."
            if "RayWorker" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.NoSuchProcess:  # ended between the listing and the look
            continue
    return found


# --- hostile images -------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30_000) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side black pixels, ~100 kB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _save(image: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def write_images(folder: Path) -> dict[str, str | None]:
    """Every kind of image a manifest can point at: {file name: None if it must render, else a
    phrase its error must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(make_image(folder / "plain.png"))

    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    # A real PostScript file: Pillow would hand it to Ghostscript, which must never run on a
    # shared cluster.
    (folder / "page.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")

    ramp = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    _save(Image.fromarray(ramp), folder / "16bit.png")
    _save(rgb.convert("CMYK"), folder / "cmyk.jpg")
    _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), folder / "palette.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    _save(rgba, folder / "alpha.png")
    _save(rgb.convert("L"), folder / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored sideways, shown rotated 90 degrees clockwise
    _save(rgb, folder / "exif.jpg", exif=exif)
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    _save(frames[0], folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _save(Image.new("RGB", (1, 1), (10, 200, 30)), folder / "1x1.png")
    make_image(folder / "wide.png", size=(8000, 3))
    _save(rgb, folder / "plain.webp")
    _save(rgb, folder / "plain.tiff")
    _save(rgb, folder / "plain.bmp")

    return {
        "plain.png": None,
        "truncated.jpg": "not a readable image",
        "empty.png": "empty (0 bytes)",
        "text.png": "not a readable image",
        "bomb.png": "decompression bomb",
        "page.eps": "EPS images are not read",
        "16bit.png": None,
        "cmyk.jpg": None,
        "palette.png": None,
        "alpha.png": None,
        "gray.png": None,
        "exif.jpg": None,
        "animated.gif": None,
        "1x1.png": None,
        "wide.png": None,
        "plain.webp": None,
        "plain.tiff": None,
        "plain.bmp": None,
        "missing.png": "does not exist",
    }

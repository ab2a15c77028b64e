"""Frames -> files: MP4 (H.264, yuv420p, faststart), GIF, animated WebP, numbered PNG frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from svd_batch.schema import Format

SUFFIX = {Format.mp4: ".mp4", Format.gif: ".gif", Format.webp: ".webp", Format.png: ".frames"}


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p subsamples chroma 2x2, so H.264 needs even sizes: repeat the last row/column."""
    _, h, w, _ = frames.shape
    if not (h % 2 or w % 2):
        return frames  # not a copy: a full-size clip is 44 MB
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        str(path),
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
        # moov atom first, so browsers start playing before the whole file arrives
        output_params=["-movflags", "+faststart"],
    )
    try:
        for frame in _even(frames):
            writer.append_data(frame)
    finally:
        writer.close()


def _animated(frames: np.ndarray, path: Path, fps: float, fmt: str) -> None:
    images = [Image.fromarray(f) for f in frames]
    extra = {"lossless": False, "quality": 90} if fmt == "WEBP" else {"optimize": False}
    images[0].save(
        str(path),
        format=fmt,
        save_all=True,
        append_images=images[1:],
        duration=round(1000.0 / fps),
        loop=0,
        **extra,
    )


def encode(frames: np.ndarray, fmt: Format | str, fps: float, directory: Path, stem: str) -> list[Path]:
    """Write one video in one format under `directory`; returns the files written."""
    fmt = Format(fmt)
    path = directory / f"{stem}{SUFFIX[fmt]}"
    if fmt is Format.mp4:
        _mp4(frames, path, fps)
    elif fmt is Format.gif:
        _animated(frames, path, fps, "GIF")
    elif fmt is Format.webp:
        _animated(frames, path, fps, "WEBP")
    else:
        path.mkdir(parents=True, exist_ok=True)
        files = []
        for index, frame in enumerate(frames):
            files.append(path / f"{index:05d}.png")
            Image.fromarray(frame).save(files[-1], format="PNG")
        return files
    return [path]

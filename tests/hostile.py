"""Inputs production throws at a job: every kind of image a manifest can point at.

`write_images` writes them all into a folder and says, per file, whether a job must render
it (`None`) or refuse it (a phrase the row's error must contain).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import make_image


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
    """{file name: None if it must render, else a phrase its error must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(make_image(folder / "plain.png"))

    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(bomb_png())

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

    return {
        "plain.png": None,
        "truncated.jpg": "not a readable image",
        "empty.png": "empty (0 bytes)",
        "text.png": "not a readable image",
        "bomb.png": "decompression bomb",
        "16bit.png": None,
        "cmyk.jpg": None,
        "palette.png": None,
        "alpha.png": None,
        "gray.png": None,
        "exif.jpg": None,
        "animated.gif": None,
        "1x1.png": None,
        "wide.png": None,
        "missing.png": "does not exist",
    }

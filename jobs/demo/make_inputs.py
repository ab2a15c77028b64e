"""Write the demo's input images: a dozen varied, textured pictures (no downloads needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy = np.mgrid[0:h, 0:w][0] / max(w, h)
    sky = np.stack([80 + 120 * yy, 120 + 100 * yy, 200 - 60 * yy], -1) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 10, h // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 64), (64, 96), (80, 80), (128, 72)]
    for i in range(12):
        picture(i, sizes[i % len(sizes)]).save(folder / f"scene-{i:02d}.{'jpg' if i % 3 else 'png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images")

"""Turn the bytes of any image Pillow reads into the RGB frame a row renders from."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from svd_batch.schema import FitPolicy

# Refuse images above this many pixels before decoding them: a tiny PNG can declare
# gigapixels (a decompression bomb). 8192 x 8192 is far above any SVD input size.
MAX_PIXELS = 8192 * 8192
# The formats an image row may be. Pillow can open many more, and some hand the bytes to an
# outside program (EPS and PostScript run Ghostscript): a manifest on a shared cluster is
# untrusted input, so only these decoders are ever asked.
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")


class ImageError(ValueError):
    """The row's image cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class InputImage:
    image: Image.Image  # RGB, at the render size
    width: int  # as given, before fitting
    height: int
    sha256: str


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own I->RGB conversion clips 16-bit values at 255; scale instead.
        depth = 65535.0 if img.mode.startswith("I;16") or np.asarray(img).max() > 255 else 255.0
        gray = np.clip(np.asarray(img, dtype=np.float64) / depth * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, width: int, height: int, policy: FitPolicy | str) -> Image.Image:
    policy = FitPolicy(policy)
    if policy is FitPolicy.crop:
        return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)
    if policy is FitPolicy.pad:
        return ImageOps.pad(img, (width, height), Image.Resampling.LANCZOS, color=(0, 0, 0))
    return img.resize((width, height), Image.Resampling.LANCZOS)


def load_image(data: bytes, width: int, height: int, policy: FitPolicy | str) -> InputImage:
    if not data:
        raise ImageError("image file is empty (0 bytes); point the row at a real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"image is {img.width}x{img.height}, above the {MAX_PIXELS:,}-pixel limit (refused as a "
                    "possible decompression bomb); downscale it before rendering"
                )
            img.seek(0)  # animated GIF / WebP / APNG: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image refused as a possible decompression bomb ({exc}); downscale it below {MAX_PIXELS:,} pixels"
        ) from exc
    except UnidentifiedImageError:
        raise ImageError(_unidentified(data)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable image ({exc}); re-export it as PNG or JPEG") from exc
    return InputImage(
        image=fit(_to_rgb(img), width, height, policy),
        width=img.width,
        height=img.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _unidentified(data: bytes) -> str:
    """Name the format of an image that is not one of FORMATS, if Pillow knows it: identifying
    reads only the header, and nothing is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            kind = other.format
    except Exception:
        return "not a readable image (no image format recognised in its bytes); re-export it as PNG or JPEG"
    return f"{kind} images are not read (only {', '.join(FORMATS)}); convert it to PNG or JPEG"

"""The reference side of the parity tests, run by the torch venv (`.venv/torch-reference`).

It imports nothing of svd-batch: torch diffusers and transformers read the checkpoint the way
they read any hub checkpoint, and render with the initial latents svd-batch was given.

    python torch_svd.py keys MODEL_DIR                      -> JSON: missing / unexpected keys
    python torch_svd.py render MODEL_DIR IMAGE LATENTS OUT  -> OUT.npy, float frames in [0, 1]
        (render parameters as JSON on stdin)
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from PIL import Image
from transformers import CLIPVisionModelWithProjection


def keys(model_dir: str) -> dict[str, dict[str, list[str]]]:
    loaded = {}
    for name, cls in (
        ("unet", UNetSpatioTemporalConditionModel),
        ("vae", AutoencoderKLTemporalDecoder),
        ("image_encoder", CLIPVisionModelWithProjection),
    ):
        _, info = cls.from_pretrained(f"{model_dir}/{name}", output_loading_info=True)
        loaded[name] = {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    return loaded


def render(model_dir: str, image: str, latents: str, out: str, params: dict) -> None:
    torch.manual_seed(0)
    pipe = StableVideoDiffusionPipeline.from_pretrained(model_dir)
    frames = pipe(
        Image.open(image).convert("RGB"),
        latents=torch.from_numpy(np.load(latents)[None]),
        output_type="np",
        **params,
    ).frames[0]
    np.save(out, np.asarray(frames, dtype=np.float32))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "keys":
        print(json.dumps(keys(*args)))
    else:
        render(*args, json.load(sys.stdin))

"""Random-weight SVD checkpoints: the real SVD classes, written as the hub writes them.

The tiny preset is the embedded default model (no hub exists here, and real SVD weights are
gigabytes), so it must exercise the same code a real checkpoint does: the same component
classes, the same diffusers directory layout and tensor names, the same loader. The `svd` and
`svd-xt` presets are the real architectures (configs as published with
stabilityai/stable-video-diffusion-img2vid and -img2vid-xt), for measuring memory and time at
full size. Weights come from a numpy generator seeded by the caller, so the same seed always
writes byte-identical safetensors files, and they are written one tensor at a time: building
SVD-XT (8.5 GB) takes little more memory than its largest tensor.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svd_batch.engine import runtime, weights
from svd_batch.engine.loader import empty_components

# Small configs of the SVD-XT component classes. The CLIP tower keeps SVD's 224x224 input
# (the pipeline always resizes to 224 before encoding); everything else is shrunk.
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "num_attention_heads": [2, 4],
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 96,
    "num_frames": 4,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
}
TINY_CLIP = {
    "hidden_size": 32,
    "projection_dim": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 14,
}
# Stable Video Diffusion's own scheduler settings (EDM-style Euler with Karras sigmas).
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "steps_offset": 1,
}
FEATURE_EXTRACTOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


# SVD-XT as published: its UNet (1.52 B parameters), the temporal-decoder VAE and OpenCLIP
# ViT-H/14's vision tower (0.63 B). SVD differs only in rendering 14 frames instead of 25.
XT_UNET = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [5, 10, 20, 20],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "num_frames": 25,
}
XT_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
VIT_H_14 = {
    "hidden_size": 1280,
    "projection_dim": 1024,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
}


@dataclass(frozen=True)
class Preset:
    unet: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]


PRESETS = {
    "tiny": Preset(TINY_UNET, TINY_VAE, TINY_CLIP),
    "svd": Preset({**XT_UNET, "num_frames": 14}, XT_VAE, VIT_H_14),
    "svd-xt": Preset(XT_UNET, XT_VAE, VIT_H_14),
}
INDEX = {
    "_class_name": "StableVideoDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
    "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "image_encoder": "model"}


def check_choice(preset: str, variant: str | None) -> None:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if variant not in (None, "fp16"):
        raise ValueError(f"variant {variant!r}: checkpoints are written as fp32 (no variant) or fp16")


def _constant(parameter: Any) -> np.ndarray | None:
    """A parameter's initial values when they are one constant (norm scales, zero biases, blend
    factors): those are meaningful, so they are kept; any other parameter is drawn."""
    from mindspore.common import initializer

    if parameter.has_init:
        if not isinstance(parameter.init_mode.init, initializer.Zero | initializer.One | initializer.Constant):
            return None
        values = parameter.init_data().asnumpy()
    else:
        values = parameter.asnumpy()
    return values if values.size < 2 or np.all(values == values.flat[0]) else None


def _write_weights(directory: Path, cell: Any, stem: str, rng: np.random.Generator, variant: str | None) -> None:
    """Seeded draws scaled by fan-in, in parameter-name order, under hub names; `format: pt`
    metadata as torch writes it (transformers' torch loader refuses anything else)."""
    renames = weights.hub_names(cell)
    ordered = sorted(cell.parameters_and_names(), key=lambda item: item[0])
    dtype = np.dtype(np.float16 if variant else np.float32)
    by_hub_name = {renames.get(name, name): parameter for name, parameter in ordered}

    def produce(hub_name: str) -> np.ndarray:
        parameter = by_hub_name[hub_name]
        kept = _constant(parameter)
        if kept is not None:
            return kept
        shape = tuple(parameter.shape)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        return rng.normal(0.0, fan_in**-0.5 if fan_in else 0.02, size=shape).astype(np.float32)

    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    tensors = [(hub, tuple(parameter.shape), dtype) for hub, parameter in by_hub_name.items()]
    weights.write(directory / f"{stem}{suffix}", tensors, produce, {"format": "pt"})


def build_checkpoint(out_dir: Path, seed: int = 0, variant: str | None = None, preset: str = "tiny") -> Path:
    """`variant="fp16"`: the same weights, rounded to float16, in `*.fp16.safetensors` only."""
    check_choice(preset, variant)
    runtime.configure(device="cpu")
    import mindone.diffusers
    from mindone.diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    chosen = PRESETS[preset]
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cell in empty_components(chosen.unet, chosen.vae, CLIPVisionConfig(**chosen.clip)).items():
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        if name == "image_encoder":
            cell.config.architectures = [INDEX["image_encoder"][1]]
            cell.config.save_pretrained(str(folder))
        else:
            cell.save_config(str(folder))
        _write_weights(folder, cell, WEIGHT_FILES[name], rng, variant)
    EulerDiscreteScheduler(**SCHEDULER_CONFIG).save_config(str(out_dir / "scheduler"))
    CLIPImageProcessor(**FEATURE_EXTRACTOR_CONFIG).save_pretrained(str(out_dir / "feature_extractor"))
    index = {**INDEX, "_diffusers_version": mindone.diffusers.__version__}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def ensure_checkpoint(directory: Path | None = None, seed: int = 0, preset: str = "tiny") -> Path:
    """A preset built once (the tiny one into the cache folder unless told where); concurrent
    builders never see a half-written directory."""
    directory = directory or runtime.cache_dir() / ("tiny-svd" if preset == "tiny" else preset)
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=directory.parent))
    build_checkpoint(staging, seed, preset=preset)
    try:
        staging.rename(directory)
    except OSError:  # another process finished first; theirs is identical (same seed)
        shutil.rmtree(staging, ignore_errors=True)
    return directory

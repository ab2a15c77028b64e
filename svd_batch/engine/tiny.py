"""A tiny random-weight SVD checkpoint: the real SVD classes with small configs.

It is the embedded default model (no hub exists here, and real SVD weights are gigabytes), so
it must exercise the same code a real checkpoint does: the same component classes, the same
diffusers directory layout, the same loader. Weights come from a numpy generator seeded by the
caller, so the same seed always writes byte-identical safetensors files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from svd_batch.engine import runtime

# Small configs of the SVD-XT component classes. The CLIP tower keeps SVD's 224x224 input
# (the pipeline always resizes to 224 before encoding); everything else is shrunk.
UNET_CONFIG = {
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
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
}
CLIP_CONFIG = {
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


def _seed_weights(cell: object, rng: np.random.Generator) -> None:
    """Replace random initialisations with seeded draws scaled by fan-in.

    Constant initialisations (norm scales, zero biases, blend factors) are deterministic
    already and meaningful, so they are kept.
    """
    import mindspore as ms

    for _, param in sorted(cell.parameters_and_names(), key=lambda item: item[0]):
        values = param.asnumpy()
        if values.size < 2 or np.all(values == values.flat[0]):
            continue
        fan_in = int(np.prod(values.shape[1:])) if values.ndim > 1 else 0
        std = fan_in**-0.5 if fan_in else 0.02
        drawn = rng.normal(0.0, std, size=values.shape).astype(values.dtype)
        param.set_data(ms.Tensor(drawn))


def hub_names(cell: object) -> dict[str, str]:
    """{MindSpore parameter name: the name a hub checkpoint gives the same tensor}.

    MindSpore's LayerNorm calls its scale and shift `gamma` / `beta` and its Embedding's table
    `embedding_table`; torch (and so every hub checkpoint) calls them `weight` / `bias` /
    `weight`. mindone maps hub names to its own on load but does not map back on save.
    """
    from mindspore import nn

    own = {nn.LayerNorm: {"gamma": "weight", "beta": "bias"}, nn.Embedding: {"embedding_table": "weight"}}
    renames = {}
    for path, sub in cell.cells_and_names():
        for kind, names in own.items():
            if isinstance(sub, kind):
                prefix = f"{path}." if path else ""
                renames.update({prefix + ms: prefix + hub for ms, hub in names.items()})
    return renames


def _write_as_hub_checkpoint(component: Path, renames: dict[str, str], variant: str | None) -> None:
    """Rewrite a component's weights under hub tensor names, with `format: pt` metadata:
    mindone writes `format: np`, which transformers' torch loader refuses. Variant `fp16`
    writes `<name>.fp16.safetensors` in float16 instead, as the hub's fp16 files are."""
    from safetensors.numpy import load_file, save_file

    for path in sorted(component.glob("*.safetensors")):
        tensors = {renames.get(name, name): value for name, value in load_file(str(path)).items()}
        if variant is None:
            save_file(tensors, str(path), metadata={"format": "pt"})
            continue
        half = {name: value.astype(np.float16) for name, value in tensors.items()}
        save_file(half, str(path.with_suffix(f".{variant}.safetensors")), metadata={"format": "pt"})
        path.unlink()


def check_variant(variant: str | None) -> None:
    if variant not in (None, "fp16"):
        raise ValueError(f"variant {variant!r}: the tiny model is written as fp32 (no variant) or fp16")


def build_tiny_model(out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
    """`variant="fp16"`: the same weights, rounded to float16, in `*.fp16.safetensors` only."""
    check_variant(variant)
    runtime.configure(device="cpu")
    from mindone.diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from mindone.transformers import CLIPVisionModelWithProjection
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    rng = np.random.default_rng(seed)
    unet = UNetSpatioTemporalConditionModel(**UNET_CONFIG)
    vae = AutoencoderKLTemporalDecoder(**VAE_CONFIG)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_CONFIG))
    for component in (unet, vae, image_encoder):
        _seed_weights(component, rng)
    feature_extractor = CLIPImageProcessor(**FEATURE_EXTRACTOR_CONFIG)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        feature_extractor=feature_extractor,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # mindone warns that it cannot save the processor, with its whole config as JSON (40 lines);
    # it is saved just below, so the warning is noise.
    pipeline_log = logging.getLogger("mindone.diffusers.pipelines.pipeline_utils")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.ERROR)
    try:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        pipeline_log.setLevel(level)
    # mindone cannot save transformers' processor: it writes [null, null] for it, which its
    # own from_pretrained then rejects. Save it ourselves and name its class.
    feature_extractor.save_pretrained(str(out_dir / "feature_extractor"))
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name, component in (("unet", unet), ("vae", vae), ("image_encoder", image_encoder)):
        _write_as_hub_checkpoint(out_dir / name, hub_names(component), variant)
    return out_dir


def ensure_tiny_model(directory: Path | None = None, seed: int = 0) -> Path:
    """The embedded default model, built once (into the cache folder unless told where);
    concurrent builders never see a half-written directory."""
    directory = directory or runtime.cache_dir() / "tiny-svd"
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    build_tiny_model(staging, seed)
    try:
        staging.rename(directory)
    except OSError:  # another process finished first; theirs is identical (same seed)
        shutil.rmtree(staging, ignore_errors=True)
    return directory

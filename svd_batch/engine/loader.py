"""Load a StableVideoDiffusionPipeline from a local diffusers-layout directory of safetensors."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svd_batch.engine import runtime
from svd_batch.engine.weights import WeightsError, index, load_into, read_header
from svd_batch.errors import first_line
from svd_batch.schema import ModelSpec

# Pickle-based formats execute code while loading; a renderer that reads user-supplied
# directories on a shared cluster must never open them.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHTED = ("unet", "vae", "image_encoder")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ModelError(ValueError):
    """The model directory cannot be loaded; the message names the file and the fix."""


@dataclass
class LoadedModel:
    pipe: Any
    path: str
    sha256: str  # over every weight file, so metadata says exactly which weights made a video
    device: str
    num_frames: int
    size_multiple: int  # height and width must be multiples of this
    dtype: str  # as in ModelSpec: fp32, fp16, bf16

    @contextmanager
    def in_float32(self) -> Iterator[None]:
        """Compute in float32 for a while, in place: half-precision overflow (NaN frames) is the
        usual reason to ask, and a second float32 copy of SVD would not fit beside the first."""
        import mindspore as ms

        # Each parameter's own dtype: loaders keep some layers in float32 inside a float16 model.
        before = [
            (parameter, parameter.dtype)
            for cell in (self.pipe.image_encoder, self.pipe.unet, self.pipe.vae)
            for parameter in cell.get_parameters()
        ]
        try:
            for parameter, _ in before:
                parameter.set_dtype(ms.float32)
            yield
        finally:
            for parameter, dtype in before:
                parameter.set_dtype(dtype)


def _weight_files(component: Path, variant: str | None) -> list[Path]:
    files = sorted(component.glob("*.safetensors"))
    if variant:
        return [f for f in files if f.name.endswith(f".{variant}.safetensors")]
    return [f for f in files if f.name.count(".") == 1]


def check_model_dir(path: Path, variant: str | None = None) -> dict[Path, list[Path]]:
    """Check layout, configs and weight headers without loading; returns weight files by component."""
    from safetensors import safe_open

    if not path.is_dir():
        raise ModelError(
            f"model directory {path} does not exist; build one with `svd-batch tiny-model {path}` "
            "or point model.path at a local SVD / SVD-XT checkpoint"
        )
    index_file = path / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{index_file} is missing; {path} is not a diffusers pipeline directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc}); restore it from the checkpoint") from exc
    weights: dict[Path, list[Path]] = {}
    for name in ("unet", "vae", "image_encoder", "scheduler", "feature_extractor"):
        entry = index.get(name)
        component = path / name
        if not entry or entry[0] is None:
            raise ModelError(f"{index_file} names no class for '{name}'; write [library, class] for it")
        configs = [component / c for c in CONFIG_NAMES if (component / c).is_file()]
        if not configs:
            raise ModelError(f"{component}/ has no config file; the '{name}' component is missing or incomplete")
        for config in configs:
            try:
                json.loads(config.read_text())
            except json.JSONDecodeError as exc:
                raise ModelError(f"{config} is not valid JSON ({exc}); restore it from the checkpoint") from exc
        if name not in WEIGHTED:
            continue
        files = _weight_files(component, variant)
        if not files:
            pickles = sorted(p.name for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(
                    f"{component}/ has only pickle weights ({', '.join(pickles)}); pickle files run code "
                    "when loaded, so they are refused. Convert them to .safetensors"
                )
            wanted = f"*.{variant}.safetensors" if variant else "*.safetensors"
            raise ModelError(f"{component}/ has no {wanted} weights; the '{name}' component is incomplete")
        for file in files:
            try:
                with safe_open(str(file), framework="numpy") as handle:
                    handle.keys()
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelError(f"{file} is not a readable safetensors file ({exc}); re-copy it") from exc
        weights[component] = files
    return weights


# Host memory one worker holds: the weights in the dtype it computes in, streamed into the
# parameters one tensor at a time (SVD-XT in fp32: 9.67 GB peak RSS for 9.02 GB of weights,
# `make bench`), a fifth more for the tensor in flight and a render's activations, plus the
# process itself (MindSpore, mindone, Ray: about 1 GiB).
LOAD_FACTOR = 1.2
RUNTIME_BYTES = 2**30
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def worker_memory(weights: dict[Path, list[Path]], dtype: str) -> int:
    """Bytes of host memory a worker needs to load and hold these weights in `dtype`, read from
    the safetensors headers alone (an fp16 file loaded as fp32 takes twice its size)."""
    elements = sum(math.prod(t.shape) for files in weights.values() for t in index(files).values())
    return int(LOAD_FACTOR * elements * ELEMENT_BYTES[dtype] + RUNTIME_BYTES)


SAMPLE_BYTES = 64


def fingerprint(path: Path, weights: dict[Path, list[Path]]) -> str:
    """A cheap identity of a checkpoint, for output keys: the configs, and of each weight file
    its name, size and safetensors header, and of every tensor in it three samples (its start,
    middle and end). Reading a few hundred KiB instead of gigabytes, it still tells apart
    weights saved again with the same shapes: retraining or fine-tuning changes a tensor
    throughout, so any changed tensor changes the fingerprint. The full sha256 is recorded
    in each metadata row too."""
    digest = hashlib.sha256()
    for config in [*sorted(path.glob("*/*.json")), path / "model_index.json"]:
        digest.update(str(config.relative_to(path)).encode() + b"\x00" + config.read_bytes())
    for files in weights.values():
        for file in files:
            digest.update(f"{file.relative_to(path)}\x00{file.stat().st_size}".encode())
            data, header = read_header(file)
            digest.update(header)
            tensors = json.loads(header)
            tensors.pop("__metadata__", None)
            with file.open("rb") as handle:
                for name in sorted(tensors):
                    start, end = tensors[name]["data_offsets"]
                    for offset in sorted({start, (start + end) // 2, max(end - SAMPLE_BYTES, start)}):
                        handle.seek(data + offset)
                        digest.update(handle.read(min(SAMPLE_BYTES, end - offset)))
    return digest.hexdigest()[:32]


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def empty_components(unet: dict[str, Any], vae: dict[str, Any], clip: Any) -> dict[str, Any]:
    """The three weighted components of SVD from their configs, with parameters that are shapes
    only: nothing is allocated until something fills them (the loader from files, the
    checkpoint builder from a seed)."""
    from mindone.diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from mindone.transformers import CLIPVisionModelWithProjection
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        return {
            "unet": UNetSpatioTemporalConditionModel.from_config(unet),
            "vae": AutoencoderKLTemporalDecoder.from_config(vae),
            "image_encoder": CLIPVisionModelWithProjection(clip),
        }


def _assemble(path: Path, files: dict[Path, list[Path]], dtype: Any) -> Any:
    """The pipeline as `StableVideoDiffusionPipeline.from_pretrained` makes it, except that each
    tensor streams from its file into its parameter (mindone's loader would hold a second copy)."""
    from mindone.diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    cells = empty_components(
        json.loads((path / "unet" / "config.json").read_text()),
        json.loads((path / "vae" / "config.json").read_text()),
        CLIPVisionConfig.from_pretrained(str(path / "image_encoder")),
    )
    for name, cell in cells.items():
        load_into(cell, files[path / name], dtype)
        cell.set_train(False)
    return StableVideoDiffusionPipeline(
        **cells,
        scheduler=EulerDiscreteScheduler.from_pretrained(str(path / "scheduler")),
        feature_extractor=CLIPImageProcessor.from_pretrained(str(path / "feature_extractor")),
    )


def load_pipeline(spec: ModelSpec, device: runtime.Device = "cpu") -> LoadedModel:
    path = Path(spec.path).expanduser().resolve()
    if device == "cpu" and spec.dtype == "bf16":
        raise ModelError("dtype bf16 has no MindSpore CPU kernels (Conv2D takes float32); use fp32 or fp16 on CPU")
    weights = check_model_dir(path, spec.variant)
    device_label = runtime.configure(device, spec.mode)

    import mindspore as ms

    try:
        pipe = _assemble(path, weights, getattr(ms, DTYPES[spec.dtype]))
    except WeightsError as exc:  # names the file and tensor already
        raise ModelError(str(exc)) from None
    except Exception as exc:  # mindone and transformers raise bare ValueError/OSError/KeyError for bad configs
        raise ModelError(
            f"{path}: the weights do not load ({first_line(exc)}); check that configs match the weights"
        ) from exc
    if spec.forward_chunking:
        pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)
    pipe.set_progress_bar_config(disable=True)
    unet_levels = len(pipe.unet.config.block_out_channels)
    return LoadedModel(
        pipe=pipe,
        path=str(path),
        sha256=_hash_files([f for files in weights.values() for f in files]),
        device=device_label,
        num_frames=int(pipe.unet.config.num_frames),
        size_multiple=pipe.vae_scale_factor * 2 ** (unet_levels - 1),
        dtype=spec.dtype,
    )

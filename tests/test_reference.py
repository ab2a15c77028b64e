"""The embedded checkpoint is a hub checkpoint in miniature, and our frames are torch diffusers'.

torch runs in its own venv (`make test` installs `.venv/torch-reference`), in a subprocess:
the MindSpore side stays exactly what production runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from svd_batch.engine.weights import hub_names
from tests.helpers import FAST, cli, make_image, results, write_job

ROOT = Path(__file__).resolve().parents[1]
TORCH = ROOT / ".venv" / "torch-reference" / "bin" / "python"
SCRIPT = ROOT / "tests" / "reference" / "torch_svd.py"


def torch_side(*args: str, stdin: str = "") -> str:
    if not TORCH.is_file():
        pytest.fail(f"{TORCH} is missing: `make test` (or `make reference`) installs the torch reference")
    done = subprocess.run([str(TORCH), str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torch_diffusers_and_transformers_load_every_tensor_under_its_hub_name(tiny_model: Path) -> None:
    report = json.loads(torch_side("keys", str(tiny_model)).splitlines()[-1])
    assert report == {
        name: {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        for name in ("unet", "vae", "image_encoder")
    }


def test_the_loader_puts_every_hub_named_tensor_into_its_parameter_exactly(tiny_model: Path, loaded) -> None:  # type: ignore[no-untyped-def]
    pipe = loaded.pipe
    for name, cell in (("unet", pipe.unet), ("vae", pipe.vae), ("image_encoder", pipe.image_encoder)):
        stored = load_file(next((tiny_model / name).glob("*.safetensors")))
        renames = hub_names(cell)
        parameters = dict(cell.parameters_and_names())
        assert len(parameters) == len(stored), name
        for ms_name, parameter in parameters.items():
            np.testing.assert_array_equal(parameter.asnumpy(), stored[renames.get(ms_name, ms_name)], err_msg=ms_name)


def render_both(tmp_path: Path, model: Path, address: str, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(our frames through `svd-batch run`, torch diffusers' frames), from the same latents."""
    # The VAE halves the size once per block after the first (8x for SVD, 2x for the tiny model).
    factor = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    h, w = params["height"] // factor, params["width"] // factor
    latents = np.random.default_rng(5).standard_normal((params["num_frames"], 4, h, w)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    # At the render size already, so fitting it is the identity on both sides.
    image = make_image(tmp_path / "in.png", size=(params["width"], params["height"]))
    spec = write_job(
        tmp_path, [{"id": "p", "image": "in.png", "latents": "latents.npy"}], model, defaults=params, formats=["png"]
    )
    done = cli("run", str(spec), "--address", address, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    frames_dir = Path(results(spec).png_uri.iloc[0].removeprefix("file://"))
    ours = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(frames_dir.glob("*.png"))])

    reference = {k: params[k] for k in ("height", "width", "num_frames", "num_inference_steps", "fps")}
    reference |= {k: params[k] for k in ("motion_bucket_id", "noise_aug_strength", "decode_chunk_size")}
    torch_side("render", str(model), str(image), str(tmp_path / "latents.npy"), str(tmp_path / "ref.npy"),
               stdin=json.dumps(reference))  # fmt: skip
    theirs = np.load(tmp_path / "ref.npy") * 255.0
    assert ours.shape == theirs.shape == (params["num_frames"], params["height"], params["width"], 3)
    assert ours.std() > 5  # a real video, not a constant that would match anything
    return ours.astype(np.float64), theirs


PARITY = {"noise_aug_strength": 0.0, "fps": 7, "motion_bucket_id": 127}


def test_frames_through_svd_batch_run_match_torch_diffusers(
    tmp_path: Path,
    tiny_model: Path,
    ray_cluster,  # type: ignore[no-untyped-def]
) -> None:
    params = {**FAST, "num_inference_steps": 3, **PARITY}
    ours, theirs = render_both(tmp_path, tiny_model, ray_cluster.get_runtime_context().gcs_address, params)
    assert np.abs(ours - theirs).max() <= 1.0  # within 1/255 of torch diffusers


@pytest.mark.full
def test_full_size_svd_xt_through_svd_batch_run_matches_torch_diffusers(tmp_path: Path, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """`make test-full`: the real SVD-XT architecture (random weights, 8.5 GB, built once into
    the cache), rendered small so that a CPU manages it."""
    from svd_batch.engine.checkpoints import ensure_checkpoint

    model = ensure_checkpoint(preset="svd-xt")
    params = {"height": 64, "width": 64, "num_frames": 4, "num_inference_steps": 2, "decode_chunk_size": 4, **PARITY}
    ours, theirs = render_both(tmp_path, model, ray_cluster.get_runtime_context().gcs_address, params)
    assert np.abs(ours - theirs).max() <= 1.0

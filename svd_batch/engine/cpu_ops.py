"""Route the `mindspore.mint` ops that have no CPU kernel to CPU-capable equivalents.

mindone's models call `mindspore.mint` ops whose kernels exist only for Ascend. On the CPU
backend they fail at run time ("kernel ... unregistered"), and with the default asynchronous
executor the error blames a later op. The older `mindspore.ops` primitives compute the same
functions and do have CPU kernels, so this module swaps the mint entry points for thin
adapters over them. It is the only place the project patches MindSpore; `enable()` is called
only when the device target is CPU, so the Ascend path runs mindspore exactly as shipped.
Each adapter is tested against a numpy reference in `tests/test_cpu_ops.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import mint, nn, ops

Tensor = ms.Tensor
IntOrTuple = int | Sequence[int]


def _tuple(value: IntOrTuple, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def arange(start: float = 0, end: float | None = None, step: float = 1, *, dtype: Any = None) -> Tensor:
    if end is None:
        start, end = 0, start
    return ops.arange(start, end, step, dtype=dtype)


def pad(input: Tensor, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    pad = tuple(int(p) for p in pad)
    if mode == "constant":
        return ops.pad(input, pad, mode, 0.0 if value is None else value)
    return ops.pad(input, pad, mode)


def _conv_padding(padding: str | IntOrTuple, n: int) -> tuple[str, int | tuple[int, ...]]:
    """mint takes 'same'/'valid' or a padding per spatial dim; ops wants a pad_mode beside it."""
    if isinstance(padding, str):
        return padding, 0
    per_dim = _tuple(padding, n)
    if not any(per_dim):
        return "valid", 0
    return "pad", per_dim


def _conv(
    op: Callable[..., Tensor],
    n: int,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: str | IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
) -> Tensor:
    pad_mode, pads = _conv_padding(padding, n)
    out = op(input, weight, None, _tuple(stride, n), pad_mode, pads, _tuple(dilation, n), groups)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * n).astype(out.dtype)
    return out


# mint's signatures: (input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
conv2d = functools.partial(_conv, ops.conv2d, 2)
conv3d = functools.partial(_conv, ops.conv3d, 3)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution with a = -0.75 (torch's), for the 4 taps around each sample."""
    a = -0.75
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far)


def _axis_matrix(n_in: int, n_out: int, mode: str, align_corners: bool, scale: float) -> np.ndarray:
    """(n_out, n_in) matrix that resamples one axis exactly as torch's interpolate does."""
    out = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = out * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = (out + 0.5) * scale - 0.5
        if mode == "bilinear":
            src = np.maximum(src, 0.0)
    base = np.floor(src).astype(np.int64)
    frac = src - base
    if mode == "bilinear":
        taps, weights = np.stack([base, base + 1], -1), np.stack([1 - frac, frac], -1)
    else:
        taps, weights = base[:, None] + np.arange(-1, 3), _cubic_weights(frac)
    matrix = np.zeros((n_out, n_in))
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, n_in - 1)), weights)  # borders clamp, as in torch
    return matrix


def interpolate(
    input: Tensor,
    size: Any = None,
    scale_factor: Any = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
) -> Tensor:
    spatial = input.shape[2:]
    if size is None:
        factors = _float_tuple(scale_factor, len(spatial))
        size = tuple(math.floor(n * f) for n, f in zip(spatial, factors, strict=True))
        scales = (
            [n / o for n, o in zip(spatial, size, strict=True)] if recompute_scale_factor else [1 / f for f in factors]
        )
    else:
        size = _tuple(size, len(spatial))
        scales = [n / o for n, o in zip(spatial, size, strict=True)]
    if mode in ("bilinear", "bicubic") and input.ndim == 4:
        # MindSpore's CPU resize kernels use another cubic and pixel-centre convention than
        # torch, whose semantics diffusers' models were trained with; resample explicitly.
        dtype = input.dtype
        rows, cols = (
            Tensor(_axis_matrix(n, o, mode, bool(align_corners), s).astype(np.float32))
            for n, o, s in zip(spatial, size, scales, strict=True)
        )
        return ops.matmul(ops.matmul(rows, input.astype(ms.float32)), cols.T).astype(dtype)
    return ops.interpolate(input, size, None, mode, align_corners)


def _float_tuple(value: float | Sequence[float], n: int) -> tuple[float, ...]:
    return (float(value),) * n if isinstance(value, int | float) else tuple(float(v) for v in value)


def layer_norm(
    input: Tensor,
    normalized_shape: IntOrTuple,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    axes = tuple(range(-len(_tuple(normalized_shape, 1)), 0))
    mean = input.mean(axis=axes, keep_dims=True)
    centered = input - mean
    var = (centered * centered).mean(axis=axes, keep_dims=True)
    out = centered / ops.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (input + 0.044715 * input * input * input)
        return 0.5 * input * (1.0 + ops.tanh(inner))
    return 0.5 * input * (1.0 + ops.erf(input / math.sqrt(2.0)))


def zeros_like(input: Tensor, *, dtype: Any = None) -> Tensor:
    return ops.zeros(input.shape, dtype or input.dtype)


def repeat_interleave(
    input: Tensor, repeats: int | Tensor, dim: int | None = None, output_size: int | None = None
) -> Tensor:
    if dim is None:
        return ops.repeat_interleave(input.reshape(-1), repeats, 0)
    return ops.repeat_interleave(input, repeats, dim)


def _conv2d_construct(self: mint.nn.Conv2d, input: Tensor) -> Tensor:
    return _conv_cell(self, input, conv2d, 2)


def _conv3d_construct(self: mint.nn.Conv3d, input: Tensor) -> Tensor:
    return _conv_cell(self, input, conv3d, 3)


def _conv_cell(cell: Any, input: Tensor, conv: Callable[..., Tensor], n: int) -> Tensor:
    padding = cell.padding
    if cell.padding_mode != "zeros":
        input = pad(input, cell._reversed_padding, mode=cell.padding_mode)
        padding = 0
    return conv(input, cell.weight, cell.bias, cell.stride, padding, cell.dilation, cell.groups)


def _layer_norm_construct(self: nn.LayerNormExt, input: Tensor) -> Tensor:
    return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _tensor_repeat_interleave(
    self: Tensor, repeats: int | Tensor, dim: int | None = None, output_size: int | None = None
) -> Tensor:
    return repeat_interleave(self, repeats, dim, output_size)


ROUTES: list[tuple[Any, str, Callable[..., Any]]] = [
    (mint, "arange", arange),
    (mint, "zeros_like", zeros_like),
    (mint.nn.functional, "pad", pad),
    (mint.nn.functional, "conv2d", conv2d),
    (mint.nn.functional, "interpolate", interpolate),
    (mint.nn.functional, "gelu", gelu),
    (mint.nn.Conv2d, "construct", _conv2d_construct),
    (mint.nn.Conv3d, "construct", _conv3d_construct),
    (mint.nn.LayerNorm, "construct", _layer_norm_construct),
    (ms.Tensor, "repeat_interleave", _tensor_repeat_interleave),
]
"""(owner, attribute, replacement): every op this module routes, and nothing else.

Each was found failing in the SVD pipeline on CPU with pynative_synchronize=True, and each is
needed: the pipeline fails with any one of them left out (checked one by one).
"""

_originals: dict[tuple[int, str], Any] = {}


def routed_ops() -> list[str]:
    return [f"{getattr(owner, '__name__', type(owner).__name__)}.{name}" for owner, name, _ in ROUTES]


def enable() -> None:
    """Install the routes; idempotent. Must run before mindone is imported."""
    for owner, name, replacement in ROUTES:
        _originals.setdefault((id(owner), name), getattr(owner, name))
        setattr(owner, name, replacement)


def disable() -> None:
    for owner, name, _ in ROUTES:
        original = _originals.pop((id(owner), name), None)
        if original is not None:
            setattr(owner, name, original)


def enable_for_device(device_target: str) -> bool:
    """Route only on CPU; Ascend and GPU keep MindSpore's own kernels."""
    if device_target.upper() != "CPU":
        return False
    enable()
    return True

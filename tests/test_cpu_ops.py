"""Each CPU route against a numpy reference, over the argument forms the pipeline uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from svd_batch.engine import cpu_ops, runtime

runtime.configure("cpu")
import mindspore as ms  # noqa: E402
from mindspore import mint  # noqa: E402

rng = np.random.default_rng(0)
T = ms.Tensor


def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def conv_ref(x, w, b, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    n = w.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    span = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation, strict=True)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + n)))
    win = win[
        (slice(None),) * 2 + tuple(slice(None, None, s) for s in stride) + tuple(slice(None, None, d) for d in dilation)
    ]
    cin, cout = x.shape[1] // groups, w.shape[0] // groups
    out_axes, k_axes = list(range(2, 2 + n)), list(range(2 + n, 2 + 2 * n))
    parts = [
        np.einsum(
            win[:, g * cin : (g + 1) * cin],
            [0, 1, *out_axes, *k_axes],
            w[g * cout : (g + 1) * cout],
            [50, 1, *k_axes],
            [0, 50, *out_axes],
        )
        for g in range(groups)
    ]
    out = np.concatenate(parts, axis=1)
    return out if b is None else out + b.reshape((1, -1) + (1,) * n)


def close(actual, expected, atol: float = 1e-4) -> None:  # type: ignore[no-untyped-def]
    actual = actual.asnumpy() if isinstance(actual, ms.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-4)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((5,), {}, np.arange(5)),
        ((2, 9, 3), {}, np.arange(2, 9, 3)),
        ((0, 1, 0.25), {"dtype": ms.float32}, np.arange(0, 1, 0.25, dtype=np.float32)),
        ((7,), {"dtype": ms.float32}, np.arange(7, dtype=np.float32)),
    ],
)
def test_arange(args, kwargs, expected) -> None:  # type: ignore[no-untyped-def]
    out = cpu_ops.arange(*args, **kwargs)
    close(out, expected)
    if "dtype" in kwargs:
        assert out.dtype == kwargs["dtype"]


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pads", [(1, 2), (2, 1, 0, 3), (1, 1, 1, 1)])
def test_pad(mode: str, pads: tuple[int, ...]) -> None:
    # reflect/replicate pad the last len(pads)/2 dims of a (batch, channel, *spatial) input
    x = rand(2, 3, *(6, 7)[-(len(pads) // 2) :])
    width = [(0, 0)] * (x.ndim - len(pads) // 2) + [(pads[i], pads[i + 1]) for i in range(len(pads) - 2, -1, -2)]
    np_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    close(cpu_ops.pad(T(x), pads, mode=mode), np.pad(x, width, mode=np_mode))


def test_pad_constant_value() -> None:
    x = rand(1, 2, 3, 3)
    close(
        cpu_ops.pad(T(x), (1, 1, 2, 0), value=-3.5), np.pad(x, [(0, 0), (0, 0), (2, 0), (1, 1)], constant_values=-3.5)
    )


CONV2D_CASES = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": (1, 2), "dilation": (2, 1)},
    {"groups": 2, "padding": 1},
    {"padding": "same"},
    {"padding": "valid", "stride": (2, 1)},
]


@pytest.mark.parametrize("kwargs", CONV2D_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(kwargs: dict, bias: bool) -> None:
    x, w = rand(2, 4, 9, 8), rand(6, 4 // kwargs.get("groups", 1), 3, 3)
    b = rand(6) if bias else None
    padding = kwargs.get("padding", 0)
    if padding == "same":
        padding = 1
    elif padding == "valid":
        padding = 0
    expected = conv_ref(
        x,
        w,
        b,
        cpu_ops._tuple(kwargs.get("stride", 1), 2),
        cpu_ops._tuple(padding, 2),
        cpu_ops._tuple(kwargs.get("dilation", 1), 2),
        kwargs.get("groups", 1),
    )
    close(mint.nn.functional.conv2d(T(x), T(w), None if b is None else T(b), **kwargs), expected)


@pytest.mark.parametrize("kwargs", [{}, {"padding": (1, 0, 0)}, {"padding": 1, "stride": 2}])
def test_conv3d(kwargs: dict) -> None:
    x, w, b = rand(1, 3, 5, 6, 6), rand(4, 3, 3, 1, 1), rand(4)
    expected = conv_ref(
        x, w, b, cpu_ops._tuple(kwargs.get("stride", 1), 3), cpu_ops._tuple(kwargs.get("padding", 0), 3), (1, 1, 1), 1
    )
    close(cpu_ops.conv3d(T(x), T(w), T(b), **kwargs), expected)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
def test_conv2d_cell(padding_mode: str) -> None:
    cell = mint.nn.Conv2d(3, 5, 3, stride=1, padding=1, padding_mode=padding_mode)
    x = rand(2, 3, 7, 6)
    np_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}[padding_mode]
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], mode=np_mode)
    expected = conv_ref(padded, cell.weight.asnumpy(), cell.bias.asnumpy(), (1, 1), (0, 0), (1, 1), 1)
    close(cell(T(x)), expected)


def test_conv3d_cell() -> None:
    cell = mint.nn.Conv3d(4, 2, (3, 1, 1), padding=(1, 0, 0))
    x = rand(2, 4, 5, 3, 3)
    expected = conv_ref(x, cell.weight.asnumpy(), cell.bias.asnumpy(), (1, 1, 1), (1, 0, 0), (1, 1, 1), 1)
    close(cell(T(x)), expected)


def _cubic(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    def near(d: np.ndarray) -> np.ndarray:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resize_matrix(n_in: int, n_out: int, mode: str, align_corners: bool) -> np.ndarray:
    """torch's interpolate semantics, one axis at a time, as an (n_out, n_in) matrix."""
    m = np.zeros((n_out, n_in))
    dst = np.arange(n_out, dtype=np.float64)
    if mode == "nearest":
        m[np.arange(n_out), np.minimum((dst * n_in / n_out).astype(int), n_in - 1)] = 1
        return m
    if align_corners:
        src = dst * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(dst)
    else:
        src = (dst + 0.5) * n_in / n_out - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0) if not align_corners else src
        i0 = np.floor(src).astype(int)
        t = src - i0
        for offset, weight in ((0, 1 - t), (1, t)):
            np.add.at(m, (np.arange(n_out), np.clip(i0 + offset, 0, n_in - 1)), weight)
        return m
    i0 = np.floor(src).astype(int)
    for offset, weight in zip((-1, 0, 1, 2), _cubic(src - i0), strict=True):
        np.add.at(m, (np.arange(n_out), np.clip(i0 + offset, 0, n_in - 1)), weight)
    return m


@pytest.mark.parametrize(
    ("mode", "align_corners", "size"),
    [
        ("bicubic", True, (11, 9)),  # the pipeline's antialiased resize to 224x224
        ("bicubic", False, (5, 13)),
        ("bilinear", True, (12, 4)),
        ("bilinear", False, (9, 9)),
        ("nearest", None, (14, 16)),  # the VAE's 2x upsampling
    ],
)
def test_interpolate(mode: str, align_corners: bool | None, size: tuple[int, int]) -> None:
    x = rand(2, 3, 7, 8)
    mh = resize_matrix(7, size[0], mode, bool(align_corners))
    mw = resize_matrix(8, size[1], mode, bool(align_corners))
    expected = np.einsum("oh,nchw,pw->ncop", mh, x, mw)
    close(cpu_ops.interpolate(T(x), size=size, mode=mode, align_corners=align_corners), expected, atol=1e-4)


def test_interpolate_scale_factor() -> None:
    x = rand(1, 2, 3, 4)
    close(cpu_ops.interpolate(T(x), scale_factor=2.0, mode="nearest"), x.repeat(2, axis=2).repeat(2, axis=3))


@pytest.mark.parametrize("shape", [(8,), (3, 8)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(shape: tuple[int, ...], affine: bool) -> None:
    x = rand(2, 5, *shape) * 3 + 1
    axes = tuple(range(-len(shape), 0))
    expected = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
    weight, bias = (rand(*shape), rand(*shape)) if affine else (None, None)
    if affine:
        expected = expected * weight + bias
    out = cpu_ops.layer_norm(T(x), shape, None if weight is None else T(weight), None if bias is None else T(bias))
    close(out, expected)


def test_layer_norm_cell() -> None:
    cell = mint.nn.LayerNorm(16, eps=1e-6)
    x = rand(3, 4, 16)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    close(cell(T(x)), expected)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate: str) -> None:
    x = rand(4, 33) * 3
    if approximate == "none":
        expected = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    else:
        expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    close(mint.nn.functional.gelu(T(x), approximate=approximate), expected.astype(np.float32))


@pytest.mark.parametrize("dtype", [None, ms.float16])
def test_zeros_like(dtype) -> None:  # type: ignore[no-untyped-def]
    out = mint.zeros_like(T(rand(2, 3)), dtype=dtype)
    close(out, np.zeros((2, 3)))
    assert out.dtype == (dtype or ms.float32)


@pytest.mark.parametrize(("repeats", "dim"), [(2, 0), (3, 1), (2, None)])
def test_repeat_interleave(repeats: int, dim: int | None) -> None:
    x = rand(3, 4)
    close(T(x).repeat_interleave(repeats, dim=dim), np.repeat(x, repeats, axis=dim))


def test_routes_are_installed_only_for_cpu() -> None:
    # Exactly the routes docs/models.md lists: a new one must be shown necessary and documented.
    assert sorted(cpu_ops.routed_ops()) == [
        "Conv2d.construct",
        "Conv3d.construct",
        "LayerNormExt.construct",
        "Tensor.repeat_interleave",
        "mindspore.mint.arange",
        "mindspore.mint.nn.functional.conv2d",
        "mindspore.mint.nn.functional.gelu",
        "mindspore.mint.nn.functional.interpolate",
        "mindspore.mint.nn.functional.pad",
        "mindspore.mint.zeros_like",
    ]
    assert mint.arange is cpu_ops.arange  # the CPU runtime enabled them
    cpu_ops.disable()
    try:
        assert mint.arange is not cpu_ops.arange
        assert not cpu_ops.enable_for_device("Ascend")
        assert mint.arange is not cpu_ops.arange
    finally:
        assert cpu_ops.enable_for_device("CPU")
    assert mint.arange is cpu_ops.arange

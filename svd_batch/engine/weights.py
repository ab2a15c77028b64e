"""Safetensors weights streamed one tensor at a time, under the names a hub checkpoint uses.

Full SVD-XT is 9.0 GB of fp32 weights. mindone's own loader reads a whole state dict beside
the parameters (17.5 GB peak was measured), and a memory map is no better: every page read
through it counts towards the process's RSS until the file is closed. So tensors are read
with plain reads straight into the buffers the parameters keep (peak: the parameters plus
one tensor), and written from one buffer at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Safetensors dtype codes that numpy reads (SVD checkpoints are F32 or F16).
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
CODES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
ALIGN = 8  # the header is padded so that every tensor starts 8-byte aligned, as safetensors does


class WeightsError(ValueError):
    """A weight file does not hold what its component needs; the message names file and tensor."""


@dataclass(frozen=True)
class Stored:
    file: Path
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file


def read_header(file: Path) -> tuple[int, bytes]:
    """(offset where the data begins, the header's JSON text) of a safetensors file."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, handle.read(size)


def index(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of a component's files (several when the checkpoint is sharded)."""
    tensors = {}
    for file in files:
        data, header = read_header(file)
        entries = json.loads(header)
        entries.pop("__metadata__", None)
        for name, entry in entries.items():
            tensors[name] = Stored(file, entry["dtype"], tuple(entry["shape"]), data + entry["data_offsets"][0])
    return tensors


def hub_names(cell: Any) -> dict[str, str]:
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


def _read(stored: Stored, handle: BinaryIO) -> np.ndarray:
    if stored.dtype not in NUMPY_DTYPES:
        raise WeightsError(f"{stored.file}: tensor dtype {stored.dtype} is not read; convert it to F32 or F16")
    values = np.empty(stored.shape, NUMPY_DTYPES[stored.dtype])
    handle.seek(stored.start)
    if handle.readinto(memoryview(values.reshape(-1).view(np.uint8))) != values.nbytes:
        raise WeightsError(f"{stored.file} ends inside a tensor: it is truncated, so re-copy it")
    return values


def load_into(cell: Any, files: list[Path], dtype: Any) -> None:
    """Fill every parameter of `cell` (built without initialising its parameters) from `files`,
    cast to MindSpore `dtype`; one tensor is in flight at a time."""
    import mindspore as ms

    tensors = index(files)
    renames = hub_names(cell)
    wanted = {ms.float32: np.float32, ms.float16: np.float16}.get(dtype)  # bf16: no numpy type
    parameters = list(cell.parameters_and_names())
    missing = [renames.get(name, name) for name, _ in parameters if renames.get(name, name) not in tensors]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise WeightsError(
            f"{files[0].parent}/ lacks {len(missing)} tensor(s) its config makes ({shown}); the weights and "
            "config.json are from different models"
        )
    with ExitStack() as stack:
        handles = {file: stack.enter_context(file.open("rb")) for file in files}
        for name, parameter in parameters:
            hub = renames.get(name, name)
            stored = tensors[hub]
            if stored.shape != tuple(parameter.shape):
                raise WeightsError(
                    f"{stored.file}: tensor {hub} has shape {list(stored.shape)}, its config makes "
                    f"{list(parameter.shape)}; the weights and config.json are from different models"
                )
            values = _read(stored, handles[stored.file])
            if wanted is not None and values.dtype != wanted:
                values = values.astype(wanted)
            tensor = ms.Tensor.from_numpy(values) if wanted is not None else ms.Tensor(values, dtype=dtype)
            if parameter.dtype != dtype:  # set_data would convert the data to the parameter's dtype
                parameter.set_dtype(dtype)  # cheap: the parameter has no data yet
            parameter.set_data(tensor)


def write(
    file: Path,
    tensors: list[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file whose tensors (name, shape, dtype) are made one at a time by
    `produce(name)`, in the order given: only one of them is in memory at once."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGN)
    with file.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape, dtype in tensors:
            values = np.ascontiguousarray(produce(name), dtype=dtype)
            if values.shape != tuple(shape):
                raise ValueError(f"{name}: made {values.shape}, announced {shape}")
            handle.write(memoryview(values.reshape(-1).view(np.uint8)))

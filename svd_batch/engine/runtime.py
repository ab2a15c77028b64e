"""Put this process's MindSpore on one device, once.

A worker owns exactly one accelerator. On Ascend, Ray narrows `ASCEND_RT_VISIBLE_DEVICES`
to the device it granted, so inside the worker that device is always logical id 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

Device = Literal["cpu", "npu"]
Mode = Literal["pynative", "graph"]

_configured: tuple[str, int, str] | None = None


def cache_dir() -> Path:
    """svd-batch's own cache: the tiny model, MindSpore's compile dumps."""
    return Path(os.environ.get("SVD_BATCH_CACHE", Path.home() / ".cache" / "svd-batch"))


def ascend_device_id(environ: Mapping[str, str]) -> int:
    """The logical device id this process should use on Ascend."""
    visible = environ.get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    if visible:
        return 0
    return int(environ.get("DEVICE_ID", "0"))


def configure(device: Device = "cpu", mode: Mode = "pynative") -> str:
    """Set the MindSpore context and, on CPU only, route mint ops to CPU kernels.

    Returns a label naming the device, for the metadata.
    """
    global _configured
    target = "CPU" if device == "cpu" else "Ascend"
    device_id = 0 if device == "cpu" else ascend_device_id(os.environ)
    wanted = (target, device_id, mode)
    if _configured is not None:
        if _configured != wanted:
            raise RuntimeError(f"MindSpore is already configured as {_configured}; cannot switch to {wanted}")
        return _label(device, device_id)

    # MindSpore writes graph-compile dumps (rank_0/om/analyze_fail.ir) and compile caches into
    # the working directory unless told otherwise; a job's cwd is the user's, never a dump site.
    os.environ.setdefault("MS_OM_PATH", str(cache_dir() / "mindspore"))
    os.environ.setdefault("MS_COMPILER_CACHE_PATH", str(cache_dir() / "mindspore" / "compiler"))
    import mindspore as ms

    from svd_batch.engine import cpu_ops

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device(target, device_id)
    if target == "CPU":
        # On CPU the asynchronous op queue thrashes on few cores (3-5x slower, measured),
        # and synchronous execution makes a failing kernel blame the right op.
        ms.runtime.launch_blocking()
    cpu_ops.enable_for_device(target)
    _import_mindone()  # after the routes: mindone binds some ops when its modules load
    _configured = wanted
    return _label(device, device_id)


def _import_mindone() -> None:
    """Import mindone's diffusers and transformers, once, without their import-time chatter:
    transformers' docstring helper prints "Config not found for parakeet" for models mindone
    ships without a config, straight to stdout, where a job's output is the user's; and
    mindone's own modules raise FutureWarnings about transformers APIs as they load."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import mindone.diffusers
        import mindone.transformers  # noqa: F401


def _label(device: Device, device_id: int) -> str:
    if device == "cpu":
        return "cpu"
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    physical = visible.split(",")[0] if visible else str(device_id)
    return f"npu:{physical}"

"""Section 10 of `make bench`: what a user waits for before the first video, and its parts.

launch   `svd-batch run` as a user starts it, on a fresh 1M-row manifest: seconds from the
         command's launch to the first ok row in the run's `_status.json` (then SIGTERM,
         which drains). It counts the CLI's imports, Ray's local start, planning, the
         worker's start and its first call.
worker   a worker's start, part by part, in a fresh process: MindSpore's import, the CPU
         routes with mindone's imports, the pipeline's assembly and weights, the first call of
         4 rows and a second; and, in another process, mindone's two package faces alone (the
         transformers face imports every model mindone ships).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER_SCRIPT = """
import json, sys, time
stamps = [("start", time.perf_counter())]
def mark(name):
    stamps.append((name, time.perf_counter()))
import svd_batch
from svd_batch.engine import runtime
from svd_batch.engine.renderer import Renderer, VideoRequest
mark("python, svd_batch")
import mindspore
mark("mindspore")
runtime.configure("cpu")
mark("CPU routes, mindone's faces")
from mindone.diffusers import StableVideoDiffusionPipeline
mark("the SVD pipeline module")
from pathlib import Path
from jobs.demo.make_inputs import picture
from svd_batch.engine.loader import load_pipeline
from svd_batch.images import fit
from svd_batch.schema import ModelSpec, RenderParams
renderer = Renderer(load_pipeline(ModelSpec(path=Path(sys.argv[1]))), max_batch=4)
mark("assembly and weights")
params = renderer.resolve(RenderParams(**json.loads(sys.argv[2])))
requests = [VideoRequest(fit(picture(i, (48, 40)), 32, 32, "crop"), params, i) for i in range(4)]
renderer.render(requests)
mark("first call, 4 rows")
renderer.render(requests)
mark("second call, 4 rows")
print(json.dumps({b[0]: b[1] - a[1] for a, b in zip(stamps, stamps[1:])}))
"""

# mindone's two package faces alone (no rendering here, so the order against the routes is moot).
FACES_SCRIPT = """
import contextlib, io, json, time
import mindspore
with contextlib.redirect_stdout(io.StringIO()):
    started = time.perf_counter()
    import mindone.diffusers
    diffusers = time.perf_counter()
    import mindone.transformers
    transformers = time.perf_counter()
print(json.dumps({"mindone.diffusers": diffusers - started, "mindone.transformers": transformers - diffusers}))
"""


def _script(script: str, root: Path, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_start(model: Path, params: dict[str, Any], root: Path) -> dict[str, Any]:
    """A worker's start, part by part (seconds), in a process of its own as Ray starts one;
    and mindone's faces alone, in another."""
    return {"parts": _script(WORKER_SCRIPT, root, str(model), json.dumps(params)), "faces": _script(FACES_SCRIPT, root)}


def launch(spec_path: Path, metadata: Path, root: Path, timeout: float = 600) -> dict[str, Any]:
    """Seconds from `svd-batch run`'s launch to the first ok row its `_status.json` counts."""
    cli = Path(sys.executable).with_name("svd-batch")
    started = time.perf_counter()
    run = subprocess.Popen(
        [str(cli), "run", str(spec_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=root
    )
    first = None
    while first is None and run.poll() is None and time.perf_counter() - started < timeout:
        try:
            if json.loads((metadata / "_status.json").read_text())["counts"].get("ok"):
                first = time.perf_counter() - started
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.1)
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)  # drains: the batches in flight finish, the rest is left
    _, err = run.communicate(timeout=timeout)
    if first is None:
        raise RuntimeError(f"svd-batch run made no video: {err[-2000:]}")
    return {"first_video_from_launch_s": first, "exit_code": run.returncode, "cpus": os.cpu_count()}


def run(model: Path, params: dict[str, Any], folder: Path, root: Path) -> dict[str, Any]:
    """Both measures; `folder` holds the 1M-row manifest (a fresh output each time)."""
    output = folder / f"out-launch-{time.time_ns()}"
    spec = {"name": "launch", "manifest": "manifest.jsonl", "output": str(output),
            "model": {"path": str(model)}, "defaults": params}  # fmt: skip
    (folder / "launch.yaml").write_text(json.dumps(spec))
    return {"worker": worker_start(model, params, root), **launch(folder / "launch.yaml", output / "metadata", root)}


def rows(r: dict[str, Any]) -> list[str]:
    parts, faces = r["worker"]["parts"], r["worker"]["faces"]
    start = sum(seconds for name, seconds in parts.items() if not name.startswith("second"))
    said = "; ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items())
    alone = "; ".join(f"{name} {seconds:.1f} s" for name, seconds in faces.items())
    return [
        f"| 10 first video from `svd-batch run`'s launch, fresh 1M-row manifest (CLI, Ray's local start, planning, "
        f"a worker's start and first call) | **{r['first_video_from_launch_s']:.1f} s** | <= 30 s |",
        f"| 10 a worker's start, part by part ({said}) | **{start:.1f} s** to its first 4 videos | |",
        f"| 10 mindone's package faces, imported alone after MindSpore ({alone}) | | |",
    ]

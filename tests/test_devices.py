"""The simulated device, and a device whose path holds only device work: the CPU work of one
batch runs beside the next batch's render, within a bound on the frames held."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svd_batch.control import History, JobControl
from svd_batch.device import CpuClock, DeviceClock, FrameMeter
from svd_batch.driver import Job, load_spec
from svd_batch.engine import simulated
from svd_batch.engine.renderer import VideoRequest
from svd_batch.schema import RenderParams
from svd_batch.scores import score_clip
from tests.helpers import (
    FAST,
    latest_results,
    results,
    rows_and_images,
    run_control,
    run_job,
    run_records,
    simulated_view,
    videos_match_metadata,
    wait_until,
    write_job,
)


def test_simulated_frames_have_the_rows_size_and_count_and_move_by_their_seed() -> None:
    renderer = simulated.SimulatedRenderer(simulated.model(), seconds=0.001)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    params = renderer.resolve(RenderParams(height=64, width=96, num_frames=6))
    a, b, a_again = renderer.render([VideoRequest(image, params, 1), VideoRequest(image, params, 2)]) + renderer.render(
        [VideoRequest(image, params, 1)]
    )
    assert a.frames.shape == (6, 64, 96, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, a_again.frames)  # a seed's clip, whatever its batch
    assert not np.array_equal(a.frames, b.frames)
    assert score_clip(a.frames, np.asarray(image)).motion > 0.5  # real work for the scores: it moves
    assert a.batch == 2 and a_again.batch == 1
    # The model's own clip length is SVD-XT's; it refuses what a real model would.
    assert renderer.resolve(RenderParams(height=64, width=96)).num_frames == simulated.NUM_FRAMES
    with pytest.raises(ValueError, match="more than the 25 this model was trained for"):
        renderer.resolve(RenderParams(height=64, width=96, num_frames=30))


def test_a_simulated_worker_imports_no_mindspore_and_loads_no_weights(tmp_path: Path) -> None:
    """In a fresh process, as a Ray worker is: a row rendered on the simulated device."""
    rows = rows_and_images(tmp_path, 1)
    spec = write_job(tmp_path, rows, tmp_path / "no-model-here", defaults=FAST)
    program = f"""
import sys
from svd_batch.driver import load_spec
from svd_batch.plan import Planner
from svd_batch.schema import ManifestRow
from svd_batch.worker import RowWorker
spec = load_spec(__import__("pathlib").Path({str(spec)!r}), simulate=0.01)
planner = Planner(spec, spec.manifest, "r", "w")
items = [r.work_item() for r in planner.resolve(ManifestRow(id="a", image={str(tmp_path / rows[0]["image"])!r}), 1)]
(row,) = RowWorker(spec).process(items)
print(row.status, row.device, row.model_sha256, "mindspore" in sys.modules, "mindone" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "sim", simulated.FINGERPRINT, "False", "False"]


def test_device_busy_counts_calls_over_the_span_from_the_first_to_the_last() -> None:
    now = [0.0]
    clock = DeviceClock(clock=lambda: now[0])
    assert clock.busy is None
    for start, end in ((10.0, 14.0), (15.0, 19.0), (19.0, 20.0)):  # a 1 s wait for the CPU at 14
        now[0] = start
        with clock.computing():
            now[0] = end
    assert clock.busy == pytest.approx(9.0 / 10.0)
    assert clock.busy_s == pytest.approx(9.0)


def test_frames_are_counted_while_held_and_the_peak_kept() -> None:
    meter = FrameMeter()
    with meter.holding(100):
        with meter.holding(50):
            assert meter.held == 150
        assert meter.held == 100
    assert (meter.held, meter.peak) == (0, 150)


def test_cpu_seconds_of_a_stage_include_its_child_processes() -> None:
    cpu = CpuClock()
    # The child spins, then says how much CPU it spent: the figure each stage is held to.
    spin = (
        "import resource, time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
        "used = resource.getrusage(resource.RUSAGE_SELF)\nprint(used.ru_utime + used.ru_stime)"
    )
    with cpu.stage("encode", children=True):
        encoded = float(subprocess.run([sys.executable, "-c", spin], check=True, capture_output=True).stdout)
    with cpu.stage("upload"):
        uploaded = float(subprocess.run([sys.executable, "-c", spin], check=True, capture_output=True).stdout)
    # Counted where the stage asks for it (all of it), and only there (the parent's own share,
    # starting a process and waiting for it, is a small part of what the child spun).
    assert cpu.seconds["encode"] >= encoded
    assert cpu.seconds["upload"] < uploaded
    cpu.made()
    assert cpu.videos == 1


def test_job_control_tells_a_workers_two_calls_apart_and_a_restart_kills_both() -> None:
    control = JobControl()
    control.begin("w1", 10, ["a"], slot=0)
    control.begin("w1", 10, ["b"], slot=1)  # the same process's other slot: nobody died
    assert sorted(control.in_flight()) == [(10, ["a"]), (10, ["b"])]
    control.end("w1", slot=0)
    control.begin("w1", 10, ["c"], slot=0)
    assert control.history == {}
    # A new process of the same worker: both open calls died with the old one, and none held the
    # device, so both are charged.
    draining, history = control.begin("w1", 11, ["b", "c", "d"], slot=0)
    assert history == {"b": History(deaths=1), "c": History(deaths=1)} and not draining
    assert control.in_flight() == []
    # Only the call on the device is charged when a process dies: what kills it is its render.
    control.begin("w2", 20, ["e"], slot=0)
    control.begin("w2", 20, ["f"], slot=1)
    control.device_taken("w2", 20, slot=1)
    assert control.on_device() == [(20, ["f"])]
    control.begin("w2", 21, ["g"], slot=0)
    assert control.history["f"] == History(deaths=1) and "e" not in control.history
    assert control.in_flight() == [(21, ["g"])]


@pytest.mark.slow
def test_a_simulated_run_writes_under_simulated_and_leaves_the_real_outputs_untouched(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` runs jobs on simulated devices and reads their outputs under simulated/
    (test_job.py::test_driver_killed_mid_job_is_resumed_by_rerunning and others); this one also
    checks a real job's outputs beside them are untouched."""
    rows = rows_and_images(tmp_path, 2)
    spec = write_job(tmp_path, rows, tiny_model, shards={"size": 2})
    assert run_job(spec) == Counter(ok=2)
    output = Path(load_spec(spec).output)

    def real_files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and "simulated" not in p.parts}

    before, real = real_files(), latest_results(spec)
    simulated_spec = load_spec(spec, simulate=0.05)
    assert simulated_spec.output == str(output / "simulated")
    assert Job(simulated_spec).run() == Counter(ok=2)

    assert real_files() == before  # not a file of the real job written, moved or touched
    assert run_job(spec) == Counter(skipped=2)  # its ledger: done, as it was
    assert latest_results(spec).equals(real)
    view = simulated_view(spec)
    assert {p.name for p in output.joinpath("simulated").iterdir()} >= {"videos", "metadata", "runs", "shards"}
    sim = latest_results(view)
    assert (sim.device == "sim").all() and (sim.model_sha256 == simulated.FINGERPRINT).all()
    assert not set(sim.key) & set(real.key)  # its own keys: a simulated video is never a real one's
    (record,) = run_records(view)
    assert record.model_fingerprint == simulated.FINGERPRINT and 0 < record.device_busy <= 1
    assert set(record.cpu_s_per_video) == {"score", "encode", "upload"}


@pytest.mark.parametrize("calls", [1, 2])
def test_a_device_runs_ahead_of_its_cpu_work_by_at_most_its_calls(
    tmp_path: Path, tiny_model: Path, ray_cluster: object, calls: int
) -> None:
    """A fast device and slow CPU work (large frames to score and encode): the device is held
    back, and the frames a worker holds stay within `calls` batches."""
    rows = rows_and_images(tmp_path, 6)
    size = {"height": 256, "width": 448, "num_frames": 8}
    workers = {"count": 1, "batch_size": 2, "calls": calls}
    spec = write_job(tmp_path, rows, tiny_model, defaults=size, workers=workers)
    assert Job(load_spec(spec, simulate=0.01)).run() == Counter(ok=6)
    (record,) = run_records(simulated_view(spec))
    batch_mb = 2 * 256 * 448 * 8 * 3 / 2**20
    assert record.frames_peak_mb <= calls * batch_mb + 0.1
    if calls == 2:  # the next batch rendered while the last one was written
        assert record.frames_peak_mb > batch_mb + 0.1


def test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    import ray

    rows = rows_and_images(tmp_path, 6)
    size = {"height": 256, "width": 448, "num_frames": 14}
    spec = write_job(tmp_path, rows, tiny_model, defaults=size, workers={"count": 1, "batch_size": 1})
    job = Job(load_spec(spec, simulate=0.5))
    outcome: list[Counter[str]] = []
    thread = threading.Thread(target=lambda: outcome.append(job.run()))
    thread.start()
    control = wait_until(lambda: run_control(job.run_id), "the run's control actor", timeout=300)

    def both_slots_busy() -> tuple[int, list[str], list[str]] | None:
        calls, rendering = ray.get([control.in_flight.remote(), control.on_device.remote()])
        pids = {pid for pid, _ in calls}
        if len(calls) == 2 and len(pids) == 1 and rendering:
            return pids.pop(), [key for _, keys in calls for key in keys], rendering[0][1]
        return None

    pid, in_flight, on_device = wait_until(both_slots_busy, "a worker with a batch written and one rendering", 300)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert outcome == [Counter(ok=6)]  # Ray Data restarted the worker and gave it both batches again
    view = simulated_view(spec)
    df = results(view)
    assert len(df) == len(set(df.key)) == 6  # one row each: none made twice
    # The row on the device is charged the death; the one being written died with it, blameless.
    assert (df[df.key.isin(on_device)].attempt == 2).all() and len(on_device) == 1
    assert (df[~df.key.isin(on_device)].attempt == 1).all() and len(in_flight) == 2
    assert videos_match_metadata(view)

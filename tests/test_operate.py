"""Operating a job: parameter sweeps, deadlines and drains, and the Ray Jobs API."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import pytest
from pydantic import ValidationError

from chaos.proxy import free_port
from svd_batch.driver import EXIT_STOPPED, Job, JobError, load_spec
from svd_batch.engine import simulated
from svd_batch.limits import deadline_label, next_deadline, parse_duration
from svd_batch.plan import Planner
from svd_batch.schema import JobSpec, ManifestRow
from tests.helpers import (
    FAST,
    SIMULATE,
    cli,
    results,
    rows_and_images,
    run_job,
    run_records,
    simulated_view,
    status_counts,
    wait_until,
    worker_pids,
    write_job,
)


def spec_with(**fields: object) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "s", "manifest": "/m/manifest.jsonl", "output": "/o", "model": {"path": "/x"}, **fields}
    )


def test_sweep_expands_each_row_into_every_combination() -> None:
    spec = spec_with(sweep={"motion_bucket_id": [40, 200], "seed": [0, 1]})
    items = Planner(spec, spec.manifest, "r", "weights").resolve(ManifestRow(id="cat", image="cat.png"), 1)
    assert [(i.id, i.params.motion_bucket_id, i.seed) for i in items] == [
        ("cat[motion_bucket_id=40,seed=0]", 40, 0),
        ("cat[motion_bucket_id=40,seed=1]", 40, 1),
        ("cat[motion_bucket_id=200,seed=0]", 200, 0),
        ("cat[motion_bucket_id=200,seed=1]", 200, 1),
    ]
    assert len({i.key for i in items}) == 4


def test_sweep_keys_are_checked() -> None:
    with pytest.raises(ValidationError, match="did you mean 'motion_bucket_id'"):
        spec_with(sweep={"motion_bucket": [1, 2]})
    with pytest.raises(ValidationError, match="at least one value"):
        spec_with(sweep={"fps": []})


def test_deadline_is_the_next_occurrence_in_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    local(monkeypatch, "America/New_York")
    now = dt.datetime(2026, 11, 27, 23, 0, tzinfo=NEW_YORK)
    assert next_deadline("06:30", now) == dt.datetime(2026, 11, 28, 6, 30, tzinfo=NEW_YORK)
    assert next_deadline("23:30", now) == dt.datetime(2026, 11, 27, 23, 30, tzinfo=NEW_YORK)
    assert parse_duration("8h") == 8 * 3600 and parse_duration("1h30m") == 5400 and parse_duration("45s") == 45
    with pytest.raises(ValueError, match="like 8h, 90m or 1h30m"):
        parse_duration("eight hours")


BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")


def local(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """The process's local time zone, as TZ sets it for a driver on such a machine."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()


@pytest.fixture(autouse=True)
def _restore_local_time() -> Iterator[None]:
    yield
    time.tzset()  # torn down after monkeypatch, which has put TZ back by then


@pytest.mark.parametrize(
    ("now", "wall_hours", "real_hours"),
    [
        (dt.datetime(2026, 3, 28, 22, 0, tzinfo=BERLIN), 8.5, 7.5),  # the clock springs forward at 02:00
        (dt.datetime(2026, 10, 24, 22, 0, tzinfo=BERLIN), 8.5, 9.5),  # and falls back at 03:00
        (dt.datetime(2026, 12, 3, 22, 0, tzinfo=BERLIN), 8.5, 8.5),
    ],
)
def test_a_deadline_in_a_named_zone_is_that_clocks_time_across_a_dst_change(
    monkeypatch: pytest.MonkeyPatch, now: dt.datetime, wall_hours: float, real_hours: float
) -> None:
    local(monkeypatch, "UTC")  # the cluster's driver runs in UTC; the operator's night is Berlin's
    deadline = next_deadline("06:30@Europe/Berlin", now)
    assert deadline.astimezone(BERLIN).strftime("%d %H:%M") == f"{now.day + 1:02d} 06:30"
    # The seconds the run really gets (in UTC: Python subtracts two times of one zone on the wall clock).
    assert (deadline.astimezone(dt.UTC) - now.astimezone(dt.UTC)).total_seconds() / 3600 == real_hours
    assert (deadline.replace(tzinfo=None) - now.replace(tzinfo=None)).total_seconds() / 3600 == wall_hours
    # The same night, with the driver's own clock in Berlin and a bare HH:MM: the same instant.
    local(monkeypatch, "Europe/Berlin")
    assert next_deadline("06:30", now) == deadline
    label = deadline_label(next_deadline("06:30@Europe/Berlin", now))
    assert label.startswith(f"{deadline:%Y-%m-%d} 06:30 Europe/Berlin (")


def test_an_iso_deadline_needs_its_offset_and_bad_deadlines_say_how_to_write_them() -> None:
    now = dt.datetime(2026, 12, 3, 22, 0, tzinfo=dt.UTC)
    assert next_deadline("2026-12-04T06:30+01:00", now) == dt.datetime(2026, 12, 4, 5, 30, tzinfo=dt.UTC)
    for text, message in [
        ("2026-12-04T06:30", "has no UTC offset; add one"),
        ("2026-12-01T06:30Z", "has passed"),
        ("06:30@Mars/Olympus", "unknown time zone 'Mars/Olympus'; use an IANA name such as Europe/Berlin"),
        ("half past six", "is not HH:MM, HH:MM@Area/City or an ISO time with its offset"),
        ("25:00", "e.g. 06:30, 06:30@Europe/Berlin"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            next_deadline(text, now)


def test_drain_finishes_in_flight_rows_and_the_rerun_resumes(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """On simulated devices: draining is the driver's and the workers' logic, not the model's."""
    workers = {"count": 1, "batch_size": 1}
    spec = write_job(tmp_path, rows_and_images(tmp_path, 6), tiny_model, workers=workers, simulate=SIMULATE)
    job = Job(load_spec(spec))
    refused: list[str] = []

    def drain_and_resubmit(counts: Counter[str], total: int) -> None:
        if counts.get("ok") and not refused:
            job.drain("test drain")
            try:  # a resubmit while the drain runs: the draining run still holds the output
                Job(load_spec(spec)).start()
            except JobError as exc:
                refused.append(str(exc))

    job.progress = drain_and_resubmit
    counts = job.run()
    assert job.stopped == "test drain" and 1 <= counts["ok"] < 6 and counts["left"] == 6 - counts["ok"]
    assert len(refused) == 1 and f"run {job.run_id}" in refused[0] and "holds its lease" in refused[0]
    df = results(spec)
    assert set(df.status) == {"ok"}  # rows not started are left for the rerun, not failed
    again = Job(load_spec(spec)).run()
    assert again == Counter(ok=counts["left"], skipped=counts["ok"])


def test_sigterm_drains_and_exits_with_its_own_code(tmp_path: Path, tiny_model: Path, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    spec = write_job(tmp_path, rows_and_images(tmp_path, 6), tiny_model, workers={"count": 1, "batch_size": 1})
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "svd_batch.cli", "run", str(spec), "--address", address, "--simulate", str(SIMULATE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status = Path(load_spec(spec, simulate=SIMULATE).metadata_uri) / "_status.json"
    wait_until(lambda: status_counts(simulated_view(spec)).get("ok"), "the first ok row in _status.json")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "stopped by SIGTERM" in err and "rows left, rerun to resume" in err
    assert json.loads(status.read_text())["state"] == "stopped"


def test_max_duration_stops_the_job(tmp_path: Path, tiny_model: Path, ray_cluster: object) -> None:
    spec = write_job(tmp_path, rows_and_images(tmp_path, 3), tiny_model)
    job = Job(load_spec(spec), max_duration=0)
    counts = job.run()
    assert job.stopped and job.stopped.startswith("stopped at the 0s limit") and counts["left"] == 3
    assert job.exit_code() == EXIT_STOPPED == run_records(spec)[-1].exit_code
    # Told that rows left are a normal end (`submit` tells it so), the same stop exits 0.
    job = Job(load_spec(spec), max_duration=0, left_ok=True)
    assert job.run()["left"] == 3 and job.exit_code() == 0 == run_records(spec)[-1].exit_code
    # A signal is no time limit: it still stops with its own code.
    job = Job(load_spec(spec), left_ok=True)
    job.drain("stopped by SIGTERM")
    assert job.run()["left"] == 3 and job.exit_code() == EXIT_STOPPED


@contextlib.contextmanager
def head(folder: Path, path: str, metrics_port: int | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real Ray head with its job server, separate from the session's cluster; its jobs get
    `path` as PATH, as a head's jobs get the PATH it was started with."""
    from svd_batch import WORKER_ENV

    port, dashboard, metrics_port = free_port(), free_port(), metrics_port or free_port()
    # The session's cluster already holds Ray's fixed default agent ports (52365 ...): a second
    # head on the same machine that reuses them starts without a job agent.
    agent_ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--num-cpus=4",
            f"--resources={json.dumps({simulated.RESOURCE: 2})}",  # for the jobs that simulate
            f"--temp-dir={folder}",
            f"--metrics-export-port={metrics_port}",
            *agent_ports,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **WORKER_ENV, "PATH": path, **(env or {})},
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(lambda: _answers(f"{address}/api/version"), "the Ray head's dashboard", timeout=240, every=0.5)
        yield address
    finally:
        # `ray start --block` stops gracefully on SIGTERM, waiting on each of its processes in
        # turn (about 30 s); a test's head has nothing to keep, so it and all it started are killed.
        family = psutil.Process(process.pid).children(recursive=True)
        process.kill()
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.wait(timeout=60)
        psutil.wait_procs(family, timeout=60)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # As on a real cluster, whose image has svd-batch installed: the entrypoint finds it on PATH.
    with head(tmp_path_factory.mktemp("rayhead"), f"{Path(sys.executable).parent}:{os.environ['PATH']}") as address:
        yield address


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:  # 401 under token auth: the server is up
        return True
    except OSError:
        return False
    return True


def wait_for(job_id: str, address: str, states: set[str], timeout: float = 600) -> str:
    def state() -> str | None:
        now = cli("status", job_id, "--address", address).stdout.splitlines()[0].split()[-1]
        return now if now in states else None

    return wait_until(state, f"job {job_id} to reach {states}", timeout=timeout, every=2)


@pytest.mark.slow
def test_submit_to_a_head_that_cannot_run_svd_batch_fails_at_once_in_one_line(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> None:
    """`make test` submits to a head that can in test_submit_status_and_logs_through_the_jobs_api; this
    one needs a second head of its own.

    The trap docs/operating.md describes: a head started as .venv/bin/ray start, the venv not activated."""
    bare = ":".join(d for d in os.environ["PATH"].split(":") if d and not (Path(d) / "svd-batch").exists())
    spec = write_job(tmp_path, rows_and_images(tmp_path, 1), tiny_model)
    with head(tmp_path_factory.mktemp("rayhead"), bare) as address:  # a short path: Ray's sockets live there
        done = cli("submit", str(spec), "--address", address)
    assert done.returncode == 2 and not done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot submit {spec}: the Ray head cannot run svd-batch: svd-batch is not on"), line
    assert f"({bare})" in line and "Start the head from the environment svd-batch is installed in" in line


def test_submit_status_and_logs_through_the_jobs_api(tmp_path: Path, tiny_model: Path, ray_head: str) -> None:
    """On simulated devices (the spec says `simulate`): the Jobs API's promise is the driver's run
    on the cluster and what status and logs say of it; the model's is every other job test's."""
    with pytest.raises(urllib.error.HTTPError) as refused:  # Ray's token auth is on, and stays on
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    spec = write_job(tmp_path, rows_and_images(tmp_path, 2), tiny_model, simulate=SIMULATE)
    done = cli("submit", str(spec), "--address", ray_head)
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.strip().split()[-1]
    logs = cli("logs", job_id, "--address", ray_head, "--follow", timeout=600).stdout  # until the job ends
    # Status reads the run's own _status.json: its counts, rate and ETA under the job's state.
    said = cli("status", job_id, "--address", ray_head).stdout.splitlines()
    assert said[0] == f"{job_id} SUCCEEDED", logs[-3000:]
    assert re.fullmatch(r"ok 2  failed 0  skipped 0  [0-9.]+ videos/min  ETA 0:00:00", said[1]), said
    assert "ok" in logs and "metadata:" in logs
    assert sorted(results(spec).id) == ["q0", "q1"]  # written where the spec said, from the cluster


@pytest.mark.slow
def test_submitted_runs_verify_outputs_end_a_night_with_rows_left_and_stop(
    tmp_path: Path, tiny_model: Path, ray_head: str
) -> None:
    """`make test` submits through the Jobs API in test_submit_status_and_logs_through_the_jobs_api;
    the run's own flags are covered there by the local runs of test_max_duration_stops_the_job and
    test_sigterm_drains_and_exits_with_its_own_code."""
    spec = write_job(tmp_path / "a", rows_and_images(tmp_path / "a", 2), tiny_model)
    done = cli("submit", str(spec), "--address", ray_head, "--wait", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    # A video lost from storage is made again by a submitted run told to verify the outputs.
    gone = Path(results(spec).set_index("id").loc["q0"].mp4_uri.removeprefix("file://"))
    gone.unlink()
    done = cli("submit", str(spec), "--address", ray_head, "--verify-outputs", "--wait", timeout=600)
    assert done.returncode == 0 and gone.is_file(), done.stdout[-3000:]

    # A night that runs out with rows left is a normal night for a scheduler: SUCCEEDED, "N left".
    night = write_job(tmp_path / "c", rows_and_images(tmp_path / "c", 2), tiny_model)
    done = cli("submit", str(night), "--address", ray_head, "--max-duration", "1s", "--wait", timeout=600)
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout, done.stdout[-3000:]
    assert "stopped at the 1s limit, 2 rows left, rerun to resume" in done.stdout, done.stdout[-3000:]

    slow = write_job(
        tmp_path / "b", rows_and_images(tmp_path / "b", 8), tiny_model, defaults={**FAST, "num_inference_steps": 20}
    )
    job_id = cli("submit", str(slow), "--address", ray_head).stdout.strip().split()[-1]
    wait_for(job_id, ray_head, {"RUNNING"})
    assert cli("stop", job_id, "--address", ray_head).returncode == 0
    assert wait_for(job_id, ray_head, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"


def scrape(port: int) -> dict[str, float]:
    """Every svd-batch sample on a node's Prometheus endpoint, summed over its series."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:  # not up yet
        return {}
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_svd_batch_"):
                found[sample.name] += sample.value
    return dict(found)


@pytest.mark.slow
def test_a_jobs_metrics_are_on_the_heads_prometheus_endpoint_under_the_names_the_dashboard_uses(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> None:
    """`make test` has no Prometheus scrape: it needs a head of its own with metrics export, a job and
    a worker restart (about 2.5 min). The figures the metrics report are the ones `make test` checks
    in the run records and `_status.json` (test_devices.py,
    test_operate.py::test_submit_status_and_logs_through_the_jobs_api)."""
    board = json.loads((Path(__file__).parents[1] / "cluster" / "grafana" / "svd-batch.json").read_text())
    queries = " ".join(t["expr"] for panel in board["panels"] for t in panel["targets"])
    used = set(re.findall(r"ray_svd_batch_\w+", queries))
    assert used == {
        "ray_svd_batch_videos_total",
        "ray_svd_batch_render_seconds_bucket",
        "ray_svd_batch_device_busy_ratio",
        "ray_svd_batch_rows_left",
        "ray_svd_batch_eta_seconds",
        "ray_svd_batch_worker_restarts_total",
    }
    spec = write_job(tmp_path, rows_and_images(tmp_path, 10), tiny_model, defaults={**FAST, "num_inference_steps": 4})
    port, folder = free_port(), tmp_path_factory.mktemp("rayhead")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    # Ray exports every 10 s by default; a short job needs a closer look.
    with head(folder, path, metrics_port=port, env={"RAY_metrics_report_interval_ms": "1000"}) as address:
        done = cli("submit", str(spec), "--address", address)
        assert done.returncode == 0, done.stderr[-2000:]
        job_id = done.stdout.strip().split()[-1]
        first = wait_until(lambda: (m := scrape(port)).get("ray_svd_batch_videos_total") and m, "a video counted")
        (pid,) = wait_until(lambda: worker_pids(f"--temp-dir={folder}"), "the head's worker")
        os.kill(pid, signal.SIGKILL)  # Ray restarts it: a restart to count
        later = wait_until(
            lambda: (m := scrape(port)).keys() >= used and m["ray_svd_batch_videos_total"] > first[
                "ray_svd_batch_videos_total"] and m, "every metric the dashboard uses, and more videos",
        )  # fmt: skip
        assert wait_for(job_id, address, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    assert later["ray_svd_batch_rows_left"] < first.get("ray_svd_batch_rows_left", 10)
    assert later["ray_svd_batch_worker_restarts_total"] >= 1
    assert later["ray_svd_batch_render_seconds_count"] > 0
    assert 0 < later["ray_svd_batch_device_busy_ratio"] <= 1 and later["ray_svd_batch_eta_seconds"] >= 0


def test_estimate_renders_a_sample_of_each_setting_and_costs_each_video_by_its_device_or_its_cpu(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """How close an estimate comes to the run it foresees is a `make bench` figure; here, its
    logic (samples per setting, the arithmetic from the stage times it measured), on simulated
    devices: the model's time is what the sample measures, whatever it is."""
    rows = rows_and_images(tmp_path, 6)
    for row in rows[3:]:
        row["num_inference_steps"] = 4  # a second call setting
    workers = {"count": 1, "batch_size": 2}
    spec = write_job(tmp_path, rows, tiny_model, workers=workers, simulate=SIMULATE)
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat(timespec="minutes")
    done = cli("estimate", str(spec), "--json", "--sample", "4", "--deadline", tomorrow, "--cpus-per-device", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert found["videos"] == 6 and [(s["videos"], s["sampled"]) for s in found["settings"]] == [(3, 2), (3, 2)]
    assert found["device_hours"] == pytest.approx(found["seconds_per_video"] * 6 / 3600)
    assert found["meets_deadline"] is True and found["devices_needed"] == 1 and found["wall_hours"] > 0
    for s in found["settings"]:  # a video takes its device time, or its CPU time over the device's CPUs
        assert s["seconds_per_video"] == pytest.approx(max(s["device_s_per_video"], s["cpu_s_per_video"] / 8))
        assert s["cores_per_device"] == pytest.approx(s["cpu_s_per_video"] / s["device_s_per_video"])
        assert s["cpu_s_per_video"] > 0  # every video is scored, encoded and uploaded
    assert found["cores_per_device"] == max(s["cores_per_device"] for s in found["settings"])

    # Too little CPU beside each device: the CPU decides the time, and the estimate says so.
    starved = cli("estimate", str(spec), "--sample", "2", "--cpus-per-device", "0.01")
    assert starved.returncode == 0, starved.stderr[-2000:]
    assert "CPU cores for its scores, encode and upload, and has 0.01" in starved.stderr
    assert run_job(spec) == Counter(ok=6)

    rows += [{"id": f"more{i}", "image": "img/0.png", "num_inference_steps": 4} for i in range(60)]
    write_job(tmp_path, rows, tiny_model, workers=workers, simulate=SIMULATE)
    # A minute ahead (not passed by the time the command reads it), and only the rows the run
    # left; starved of CPU (0.01 cores a device), their videos take far longer than that.
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)).isoformat(timespec="seconds")
    done = cli("estimate", str(spec), "--deadline", soon, "--cpus-per-device", "0.01")
    said = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "60 videos left in 1 setting(s); 1 rendered on one worker" in said
    assert ": missed (" in said, said

"""The `svd-batch` command."""

from __future__ import annotations

import datetime as dt
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from svd_batch.errors import first_line
from svd_batch.schema import JobSpec, WorkItem, metadata_location
from svd_batch.terminal import drop_known_native_notes

if TYPE_CHECKING:
    from svd_batch.driver import Job

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console(soft_wrap=True)

# Small enough for the tiny model to render in seconds on a CPU.
TINY_DEFAULTS = {"height": 64, "width": 64, "num_inference_steps": 2, "decode_chunk_size": 2}


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the pipeline directory.")],
    seed: Annotated[int, typer.Option(help="Weight seed; the same seed writes identical files.")] = 0,
    variant: Annotated[
        str | None, typer.Option(help="fp16: write *.fp16.safetensors (float16), as the hub's fp16 files.")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="tiny (the default model), or svd / svd-xt: the full architectures (9 GB in fp32).")
    ] = "tiny",
) -> None:
    """Write a random-weight SVD pipeline: real SVD classes, tiny or full-size configs."""
    if directory.exists() and any(directory.iterdir()):
        raise fail(f"{directory} exists and is not empty; choose a new directory")
    from svd_batch.engine.checkpoints import build_checkpoint, check_choice

    try:
        check_choice(preset, variant)
    except ValueError as exc:
        raise fail(f"--{exc}") from None
    build_checkpoint(directory, seed, variant, preset)
    out.print(f"{preset} SVD pipeline written to {directory}")


def parse_settings(settings: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs; each value is read as YAML, so numbers, lists and names all work."""
    import yaml

    parsed = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise fail(f"--set {setting!r}: write KEY=VALUE, e.g. --set num_inference_steps=25")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise fail(f"--set {key.strip()}: {value!r} is not a value ({first_line(exc)})") from None
    return parsed


@app.command()
def render(
    images: Annotated[list[Path], typer.Argument(help="Input images (PNG, JPEG, WebP, TIFF, BMP, GIF).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the videos.")] = Path("out"),
    model: Annotated[Path | None, typer.Option(help="Local SVD pipeline directory; default: the tiny model.")] = None,
    settings: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="A render parameter as KEY=VALUE, repeatable: any field a manifest row can set (height, width, "
            "num_frames, num_inference_steps, fps, motion_bucket_id, noise_aug_strength, decode_chunk_size, "
            "num_videos_per_prompt, fit, export_fps, ...).",
        ),
    ] = [],  # noqa: B006
    seed: Annotated[int | None, typer.Option(help="Seed of every image; default: derived per image.")] = None,
    formats: Annotated[list[str], typer.Option("--format", help="mp4 | gif | webp | png; repeatable.")] = ["mp4"],  # noqa: B006
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16")] = "fp32",
    variant: Annotated[str | None, typer.Option(help="Weight file variant, e.g. fp16.")] = None,
    forward_chunking: Annotated[bool, typer.Option(help="unet.enable_forward_chunking")] = False,
) -> None:
    """Render images to videos in this process (no Ray): a quick trial of a model and settings."""
    from svd_batch.engine.loader import ModelError
    from svd_batch.storage import local_path
    from svd_batch.worker import RowWorker

    defaults = parse_settings(settings)
    if model is None:
        from svd_batch.engine.checkpoints import ensure_checkpoint

        model = ensure_checkpoint()
        defaults = {**TINY_DEFAULTS, **defaults}
    model_spec = {"path": model, "dtype": dtype, "variant": variant, "forward_chunking": forward_chunking}
    spec = _trial_spec(out_dir, defaults, formats, model_spec)
    items = _trial_items(spec, images, seed)
    try:
        worker = RowWorker(spec)
    except ModelError as exc:
        raise fail(str(exc)) from None
    rows = worker.process(items)
    for row in rows:
        if row.status == "ok":
            uris = [getattr(row, f"{f}_uri") for f in spec.formats]
            out.print(f"{row.id} (seed {row.seed}): " + " ".join(str(local_path(u)) for u in uris))
        else:
            err.print(f"[red]failed[/] {row.error}", highlight=False)
    if any(r.status != "ok" for r in rows):
        raise typer.Exit(1)


def _trial_spec(out_dir: Path, defaults: dict[str, Any], formats: list[str], model: dict[str, Any]) -> JobSpec:
    """The job a `render` trial is: its images from anywhere, its options as a spec's fields."""
    from pydantic import ValidationError

    from svd_batch.schema import explain

    try:
        return JobSpec.model_validate(
            {
                "name": "render",
                "manifest": str(Path.cwd() / "-"),
                "inputs": {"allow": ["/"]},  # the images named on the command line, wherever they are
                "output": str(out_dir.resolve()),
                "defaults": defaults,
                "formats": formats,
                "model": model,
            }
        )
    except ValidationError as exc:
        field, reason = explain(exc, JobSpec)[0]
        name = field.removeprefix("defaults.")
        raise fail(
            f"--set {name}: {reason}" if field.startswith("defaults.") else f"--{name.replace('_', '-')}: {reason}"
        ) from None


def _trial_items(spec: JobSpec, images: list[Path], seed: int | None) -> list[WorkItem]:
    """A row per image (its id the file's stem, numbered where two share one), planned."""
    from svd_batch.engine.loader import ModelError, check_model_dir, fingerprint
    from svd_batch.plan import Planner, RowError
    from svd_batch.schema import ManifestRow

    try:
        weights = fingerprint(spec.model.path, check_model_dir(spec.model.path, spec.model.variant))
    except ModelError as exc:
        raise fail(str(exc)) from None
    items = []
    planner = Planner(spec, str(Path.cwd() / "-"), "render", weights)
    for number, image in enumerate(images, start=1):
        row_id = image.stem if [i.stem for i in images].count(image.stem) == 1 else f"{image.stem}-{number}"
        try:
            resolved = planner.resolve(ManifestRow(id=row_id, image=str(image), seed=seed), number)
            items += [r.work_item() for r in resolved]
        except RowError as exc:
            raise fail(f"{image}: {exc.field}: {exc.reason}") from None
    return items


@app.command("validate")
def validate_command(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
) -> None:
    """Check the spec and every manifest row without rendering; list every bad row."""
    from svd_batch.driver import JobError, load_spec, validate
    from svd_batch.storage import StorageError

    try:
        spec = load_spec(job)
        problems = 0
        for error in validate(spec):
            problems += 1
            out.print(f"row {error.line}  id={error.row_id!r}  {error.field}: {error.reason}", highlight=False)
    except (JobError, StorageError) as exc:
        raise fail(str(exc)) from None
    if problems:
        raise fail(f"{problems} bad row(s) in {spec.manifest}", code=1)
    out.print(f"{job}: spec and manifest are valid")


SIMULATE = typer.Option(
    min=0.001,
    help="Simulated devices in place of the pipeline, SECONDS per video (one per worker, on this machine): "
    "the real planning, scores, encode, upload, shards and ledger, at the job's real sizes. Writes under "
    "OUTPUT/simulated/.",
)
DEADLINE_HELP = (
    "Stop taking rows at HH:MM (next occurrence, the driver's local time), HH:MM@Area/City (that zone's "
    "clock, e.g. 06:30@Europe/Berlin), or an ISO time with its offset."
)


@app.command()
def estimate(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    devices: Annotated[int | None, typer.Option(min=1, help="Devices to plan for; default: workers.count.")] = None,
    deadline: Annotated[str | None, typer.Option(help="When it must end: HH:MM, HH:MM@Area/City or ISO.")] = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Rows to render; default: one per distinct call setting.")
    ] = None,
    cpus_per_device: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="CPU cores beside each device on the cluster (a node's cores over its devices, e.g. 192 / 8 = 24); "
            "default: this machine's cores over --devices.",
        ),
    ] = None,
    simulate: Annotated[float | None, SIMULATE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Render a few of the rows left, on one in-process worker, and say what the whole job will take."""
    import json
    import os

    from svd_batch.driver import EXIT_CANNOT_START, JobError, load_spec
    from svd_batch.engine.loader import ModelError
    from svd_batch.estimate import estimate as measure
    from svd_batch.limits import next_deadline
    from svd_batch.manifest import ManifestError
    from svd_batch.storage import StorageError

    try:
        spec = load_spec(job, simulate)
        until = next_deadline(deadline) if deadline else None
        count = devices or spec.workers.count
        found = measure(spec, count, sample, until, cpus_per_device or (os.cpu_count() or 1) / count)
    except (JobError, ValueError, ModelError, ManifestError, StorageError) as exc:
        raise fail(str(exc), EXIT_CANNOT_START) from None
    if as_json:
        out.print_json(json.dumps(found))
    else:
        _print_estimate(spec, found, until)


def _print_estimate(spec: JobSpec, found: dict[str, Any], until: dt.datetime | None) -> None:
    from svd_batch.eta import duration

    sampled = sum(s["sampled"] for s in found["settings"])
    out.print(
        f"{spec.name}: {found['videos']:,} videos left in {len(found['settings'])} setting(s); {sampled} rendered on "
        f"one worker (model load {found['load_s']:.1f} s)",
        highlight=False,
    )
    for s in found["settings"]:
        per = f"{s['seconds_per_video']:.2f} s/video" if s["seconds_per_video"] is not None else "not measured"
        if s["sampled"]:
            per += (
                f" (device {s['device_s_per_video']:.2f} s, CPU {s['cpu_s_per_video']:.2f} s: "
                f"{s['cores_per_device']:.2f} cores per device)"
            )
        out.print(f"  {s['setting']}: {s['videos']:,} videos, {per}", highlight=False)
    needed, have = found["cores_per_device"], found["cpus_per_device"]
    out.print(f"CPU beside each device: {needed:.2f} cores needed, {have:.2f} available", highlight=False)
    if needed > have:
        err.print(
            f"[bold yellow]warning:[/] each device needs {needed:.2f} CPU cores for its scores, encode and upload, "
            f"and has {have:.2f}: the devices will wait for the CPU (the times above count it). Give each node more "
            "cores per device, or fewer devices",
            highlight=False,
            soft_wrap=True,
        )
    verdict = f"device-hours {found['device_hours']:.2f}; wall-clock at {found['devices']} device(s) "
    verdict += duration(found["wall_hours"] * 3600)
    if until is not None:
        needed_devices = found["devices_needed"]
        verdict += f"; deadline {until:%Y-%m-%d %H:%M %Z}: " + ("met" if found["meets_deadline"] else "missed")
        verdict += f" ({needed_devices} device(s) would meet it)" if needed_devices else " (no device count meets it)"
    out.print(verdict, highlight=False)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join: auto (the running local one) or HOST:PORT. Default: RAY_ADDRESS, "
            "else a private local cluster."
        ),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="Render again the rows whose failure was final (bad input or parameters).")
    ] = False,
    verify_outputs: Annotated[
        bool, typer.Option(help="List the output prefix; a done row whose video is gone is made again.")
    ] = False,
    deadline: Annotated[str | None, typer.Option(help=DEADLINE_HELP)] = None,
    max_duration: Annotated[str | None, typer.Option(help="Stop taking rows after this long, e.g. 8h or 90m.")] = None,
    left_ok: Annotated[
        bool,
        typer.Option(
            help="A run stopped by --deadline or --max-duration exits as a finished run would (0, or 1 if rows "
            "failed), not 3: rows left are the next run's. `submit` sets it, so such a Ray job SUCCEEDS."
        ),
    ] = False,
    simulate: Annotated[float | None, SIMULATE] = None,
) -> None:
    """Run a job on Ray: render every row not done yet (all its formats committed ok).

    Exit 0 all ok, 1 rows failed, 2 cannot start, 3 stopped early (deadline or signal; rerun resumes).
    SIGTERM and Ctrl-C drain: rows in flight finish and are committed; a second one stops at once.
    """
    from svd_batch.driver import EXIT_CANNOT_START, JobError, load_spec
    from svd_batch.limits import next_deadline, parse_duration

    try:
        spec = load_spec(job, simulate)
        until = next_deadline(deadline) if deadline else None
        limit = parse_duration(max_duration) if max_duration else None
    except (JobError, ValueError) as exc:
        raise fail(str(exc), EXIT_CANNOT_START) from None
    options = {"retry_failed": retry_failed, "verify_outputs": verify_outputs, "address": address, "left_ok": left_ok}
    runner, counts = _run_with_a_bar(spec, deadline=until, max_duration=limit, **options)
    _summary(spec, runner.run_id, counts)
    _run_ending(runner, counts)
    raise typer.Exit(runner.exit_code())


def _run_with_a_bar(spec: JobSpec, **options: Any) -> tuple[Job, Counter[str]]:
    """Run the job under a progress bar on stderr; a job that cannot start exits 2 in one line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Column

    from svd_batch.driver import EXIT_CANNOT_START, Job, JobError
    from svd_batch.eta import progress_line

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        # Folded, not cut, on a narrow terminal: the limit's verdict is the end of the line.
        TextColumn("{task.fields[detail]}", table_column=Column(overflow="fold")),
    )
    drop_known_native_notes()
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(spec.name, total=None, detail="planning")

        def show(counts: dict[str, int], total: int) -> None:
            bar.update(task, total=total, completed=sum(counts.values()), detail=progress_line(runner.summary()))

        runner = Job(spec, progress=show, handle_signals=True, **options)
        try:
            return runner, runner.run()
        except JobError as exc:
            bar.remove_task(task)  # the job never started: the one line below says why
            raise fail(str(exc), EXIT_CANNOT_START) from None


def _run_ending(runner: Job, counts: Counter[str]) -> None:
    """What the run's end leaves to do: its failures by class, why it stalled or stopped."""
    for (stage, kind, retryable), n in sorted(runner.failures.items(), key=lambda item: -item[1]):
        then = "the next run makes them" if retryable else "final: `--retry-failed` makes them again"
        out.print(f"failed {n}: {stage}/{kind} ({then})", highlight=False)
    if runner.stalled:
        err.print(f"[bold red]stalled:[/] {runner.stalled}", highlight=False, soft_wrap=True)
    if runner.stopped:
        unread = f" and {runner.unread_shards} shards unread" if runner.unread_shards else ""
        err.print(f"{runner.stopped}, {counts.get('left', 0)} rows left{unread}, rerun to resume", highlight=False)


def _summary(spec: JobSpec, run_id: str, counts: dict[str, int]) -> None:
    from rich.table import Table

    table = Table(title=f"{spec.name}  run {run_id}")
    names = ("ok", "failed", "skipped", "left")
    if counts.get("rejected"):  # only where quality gates rejected rows
        names = ("ok", "rejected", *names[1:])
    for name in names:
        table.add_column(name, justify="right")
    table.add_row(*(str(counts.get(n, 0)) for n in names))
    out.print(table)
    out.print(f"videos:   {spec.output}")
    out.print(f"metadata: {spec.metadata_uri}")


def _print_log(text: str) -> None:
    # A job's log as it is: Rich would read its brackets as markup and recolour its numbers.
    out.print(text, end="", markup=False, highlight=False)


ADDRESS = typer.Option(help="Ray dashboard / Jobs API address (default: RAY_JOBS_ADDRESS or http://127.0.0.1:8265).")


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    address: Annotated[str | None, ADDRESS] = None,
    retry_failed: Annotated[bool, typer.Option(help="Passed to `run`.")] = False,
    verify_outputs: Annotated[bool, typer.Option(help="Passed to `run`.")] = False,
    deadline: Annotated[str | None, typer.Option(help=DEADLINE_HELP + " Passed to `run`.")] = None,
    max_duration: Annotated[str | None, typer.Option(help="e.g. 8h, passed to `run`.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's log until it ends; exit as it did.")] = False,
) -> None:
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the job id."""
    from svd_batch import submit as jobs
    from svd_batch.driver import load_spec
    from svd_batch.limits import next_deadline, parse_duration

    try:
        load_spec(job)  # refuse a bad spec here, not on the cluster
        # A night that runs out with rows left is a normal night: the Ray job SUCCEEDS.
        run_args = ["--left-ok"] + ["--retry-failed"] * retry_failed + ["--verify-outputs"] * verify_outputs
        if deadline:
            next_deadline(deadline)
            run_args += ["--deadline", deadline]
        if max_duration:
            parse_duration(max_duration)
            run_args += ["--max-duration", max_duration]
        job_id = jobs.submit(job, address, run_args)
    except Exception as exc:
        raise fail(f"cannot submit {job}: {first_line(exc)}") from None
    out.print(f"submitted {job_id}")
    if wait:
        jobs.follow(job_id, address, _print_log)
        state = jobs.status(job_id, address)
        out.print(f"{job_id} {state}")
        raise typer.Exit(0 if state == "SUCCEEDED" else 1)


@app.command()
def status(job_id: str, address: Annotated[str | None, ADDRESS] = None) -> None:
    """Print a submitted job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), then its
    progress once it has one: counts, videos/min over the last minutes, ETA, and what its time
    limit will leave at this rate."""
    from svd_batch import submit as jobs

    out.print(f"{job_id} {jobs.status(job_id, address)}")
    if (line := jobs.progress(job_id, address)) is not None:
        out.print(line, highlight=False)


@app.command()
def logs(
    job_id: str,
    address: Annotated[str | None, ADDRESS] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a submitted job's log."""
    from svd_batch import submit as jobs

    if follow:
        jobs.follow(job_id, address, _print_log)
    else:
        _print_log(jobs.logs(job_id, address))


@app.command()
def stop(job_id: str, address: Annotated[str | None, ADDRESS] = None) -> None:
    """Stop a submitted job: Ray sends its driver SIGTERM (it drains) and kills it after 15 minutes."""
    from svd_batch import submit as jobs

    out.print(f"{job_id} {'stopping' if jobs.stop(job_id, address) else 'was not running'}")


@app.command()
def report(
    output: Annotated[
        str, typer.Argument(help="The job's output (path or s3://); metadata is read from OUTPUT/metadata.")
    ],
    metadata: Annotated[str | None, typer.Option(help="Metadata location, if not OUTPUT/metadata.")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Where to write the page (default OUTPUT/report.html).")
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="The score whose best and worst clips are shown, e.g. score_consistency.")
    ] = "score_motion",
) -> None:
    """Write one self-contained HTML report: counts, failures by kind, timings, scores, poster frames."""
    from svd_batch import report as reports

    source = metadata or metadata_location(output)
    try:
        written = reports.write(source, to or output.rstrip("/") + "/report.html", by=by)
    except Exception as exc:
        raise fail(f"cannot report on {source}: {first_line(exc)}") from None
    out.print(f"report: {written}")


def main() -> None:
    app(prog_name="svd-batch")


if __name__ == "__main__":
    sys.exit(main())

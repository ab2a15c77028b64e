"""Every schema of svd-batch, as pydantic models; the Parquet schema is derived from them.

RenderParams   what shapes one video (any field can be overridden per manifest row)
ManifestRow    one input row of a manifest
JobSpec        the job YAML
ResultRow      one metadata row per output video
"""

from __future__ import annotations

import datetime as dt
import difflib
import posixpath
import types
import typing
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBytes,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from svd_batch.storage import split_s3


class Format(StrEnum):
    mp4 = "mp4"
    gif = "gif"
    webp = "webp"
    png = "png"


class FitPolicy(StrEnum):
    """How an input image is brought to the render size."""

    crop = "crop"  # scale to cover, centre-crop the overflow
    pad = "pad"  # scale to fit, pad the rest with black
    stretch = "stretch"  # scale each axis independently


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)


Positive = Annotated[int, Field(gt=0)]
MAX_SIDE = 4096
COMMIT_EVERY_S = 10.0  # the driver's default metadata commit interval (JobSpec.commit_every_s)


class ClipScores(BaseModel):
    """A clip's scores (scores.py; units in docs/datasets.md): the `score_*` columns of its row."""

    motion: float | None = None  # None for a single frame: there is nothing to move between
    flicker: float | None = None
    sharpness: float | None = None
    fidelity: float | None = None
    consistency: float | None = None


class QualityGates(Strict):
    """Thresholds a clip must meet, and how many seeds it gets to meet them (worker.py).

    A gate is `min_<score>` or `max_<score>`; a score that could not be measured (motion of a
    one-frame clip) does not meet its gate.
    """

    min_motion: float | None = None
    max_motion: float | None = None
    max_flicker: float | None = None
    min_sharpness: float | None = None
    min_fidelity: float | None = None
    min_consistency: float | None = None
    max_tries: Annotated[int, Field(ge=1, le=16)] = 1
    keep_rejected: bool = False  # upload the best try of a rejected row (its URIs are then set)

    def failed(self, scores: ClipScores) -> list[str]:
        """The gates these scores do not meet, by name."""
        missed = []
        for gate, bound in self.model_dump(exclude={"max_tries", "keep_rejected"}).items():
            side, _, score = gate.partition("_")
            value = getattr(scores, score)
            if bound is not None and (value is None or (value < bound if side == "min" else value > bound)):
                missed.append(gate)
        return missed


class RenderParams(Strict):
    """Every parameter of the pipeline call, plus how the input is fitted and exported."""

    # Bounded: a manifest is untrusted input on a shared cluster, and memory grows with the
    # square of the side (4096 is 4x SVD-XT's 1024 side, already far beyond what it was trained for).
    height: Annotated[int, Field(gt=0, le=MAX_SIDE, multiple_of=8)] = 576
    width: Annotated[int, Field(gt=0, le=MAX_SIDE, multiple_of=8)] = 1024
    num_frames: Positive | None = None  # None: the model's own (unet.config.num_frames)
    num_inference_steps: Annotated[int, Field(gt=0, le=1000)] = 25
    sigmas: Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=1000)] | None = None
    min_guidance_scale: Annotated[float, Field(ge=0)] = 1.0
    max_guidance_scale: Annotated[float, Field(ge=0)] = 3.0
    fps: Annotated[int, Field(gt=0, le=240)] = 7  # conditioning only; the UNet sees fps - 1
    motion_bucket_id: Annotated[int, Field(ge=0, le=1023)] = 127
    noise_aug_strength: Annotated[float, Field(ge=0, le=10)] = 0.02
    decode_chunk_size: Positive | None = None  # None: all frames at once
    num_videos_per_prompt: Annotated[int, Field(gt=0, le=64)] = 1
    fit: FitPolicy = FitPolicy.crop
    export_fps: Annotated[float, Field(gt=0, le=240)] = 7.0  # frame rate of the written file
    latents: str | None = None  # .npy of initial latents (B, F, C, H/8, W/8), path or s3:// URI
    # Part of the key when set (plan.py), so changed gates judge their rows again.
    quality: QualityGates | None = None

    @model_validator(mode="after")
    def _guidance_order(self) -> RenderParams:
        if self.min_guidance_scale > self.max_guidance_scale:
            raise ValueError(
                f"min_guidance_scale ({self.min_guidance_scale}) is above max_guidance_scale "
                f"({self.max_guidance_scale}); set min <= max"
            )
        return self

    def call_key(self) -> tuple[Any, ...]:
        """Rows with equal keys can share one pipeline call (the pipeline takes these per call)."""
        return (
            self.height,
            self.width,
            self.num_frames,
            self.num_inference_steps,
            tuple(self.sigmas) if self.sigmas else None,
            self.min_guidance_scale,
            self.max_guidance_scale,
            self.fps,
            self.motion_bucket_id,
            self.noise_aug_strength,
            self.decode_chunk_size,
            self.latents,
        )


RENDER_FIELDS = tuple(RenderParams.model_fields)
_RENDER_FIELD_SET = frozenset(RENDER_FIELDS)

Tags = dict[str, str | int | float | bool | None]


class _ManifestCore(Strict):
    id: Annotated[str, Field(min_length=1, max_length=1024)]
    image: Annotated[str, Field(min_length=1)]
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    tags: Tags = Field(default_factory=dict)
    # Carried as they are into the metadata row. Neither shapes the video, so neither is in
    # its key: a changed caption does not render a row again.
    caption: str | None = None
    # The spec's columns (manifest.validate fills it): not a column of its own.
    passthrough: dict[str, JsonValue] = Field(default_factory=dict, json_schema_extra={"column": False})
    # A dataset manifest's image itself (samples.py), which `image` then only names: never a
    # manifest column (strict: no text from a JSON or CSV line passes as bytes).
    image_bytes: StrictBytes | None = Field(None, repr=False, json_schema_extra={"column": False})

    @field_validator("id")
    @classmethod
    def _printable_id(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("id contains a NUL byte; use printable characters")
        return value

    def overrides(self) -> dict[str, Any]:
        # Only the fields the row set (pydantic tracks them): most rows set none, and this runs
        # for every row of every manifest.
        return {
            name: value
            for name in self.model_fields_set & _RENDER_FIELD_SET
            if (value := getattr(self, name)) is not None
        }


def _optional(annotation: Any, constraints: list[Any]) -> Any:
    constrained = Annotated[annotation, *constraints] if constraints else annotation
    return constrained | None


# A manifest row may override any render parameter; the overrides carry RenderParams' own
# constraints, so a row is checked exactly as strictly as the job's defaults.
ManifestRow = create_model(
    "ManifestRow",
    __base__=_ManifestCore,
    __doc__="One manifest row: an id, an image, and optional overrides of the job's defaults.",
    **{name: (_optional(field.annotation, field.metadata), None) for name, field in RenderParams.model_fields.items()},
)


class ModelSpec(Strict):
    path: Path
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    variant: str | None = None  # e.g. "fp16": load diffusion_pytorch_model.fp16.safetensors
    forward_chunking: bool = False
    mode: Literal["pynative", "graph"] = "pynative"


class WorkersSpec(Strict):
    count: Annotated[int, Field(gt=0)] = 1
    device: Literal["cpu", "npu"] = "cpu"
    # Logical CPUs each worker reserves. A CPU-device worker computes on CPUs, but if the
    # workers hold every CPU, Ray Data's own tasks never get one and the job hangs.
    cpus_per_worker: Annotated[float, Field(ge=0)] = 0.5
    batch_size: Annotated[int, Field(gt=0, le=64)] = 4  # rows per pipeline call, at most
    # Calls a worker runs at once (worker.py): with 2, one batch renders while the last one is
    # scored, encoded and uploaded; 1 renders and writes in turn (the device waits for the CPU),
    # holding half the frames. More than 2 only holds more frames.
    calls: Annotated[int, Field(ge=1, le=4)] = 2
    max_attempts: Annotated[int, Field(gt=0, le=10)] = 3  # per row, across worker crashes
    # Extra Ray resources each worker asks for, e.g. {"svd_slot": 1} to pin workers to a node pool.
    resources: dict[str, float] = Field(default_factory=dict)
    # A job whose workers produce nothing for this long (e.g. no node has the resources they
    # ask for) stops and says so, instead of waiting forever.
    no_progress_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    # One render's time, at most (a call of n rows gets n times this, a gated row max_tries
    # times). Past it the worker is restarted and the row fails, retryably: a stuck kernel
    # never holds a device all night.
    row_timeout_s: Annotated[float, Field(gt=0)] = 3600.0


class InputsSpec(Strict):
    """What rows may read (see inputs.py): a manifest is untrusted input on a shared cluster."""

    # Local folders and s3://bucket/prefix roots; default: the manifest's own folder tree or prefix.
    allow: Annotated[list[str], Field(min_length=1)] | None = None
    max_bytes: Annotated[int, Field(gt=0)] = 64 * 2**20  # per input file, checked before reading


class SamplesSpec(Strict):
    """How a dataset manifest's samples become rows (samples.py): a WebDataset sample's members
    by extension, and the column a Parquet manifest's ids are in."""

    image: Annotated[list[str], Field(min_length=1)] = ["jpg", "jpeg", "png", "webp"]  # the first a sample has
    caption: str | None = "txt"  # None: no caption member
    # Render overrides, seed, tags and passthrough columns, read as a manifest line: None ignores it.
    row: str | None = "json"
    # Fields of that json left unread: by default those img2dataset writes of its own download
    # (its `width` and `height` are the image's, not the video's).
    ignore: list[str] = ["key", "status", "error_message", "width", "height", "original_width", "original_height",
                         "exif", "sha256", "md5"]  # fmt: skip
    id: Annotated[str, Field(min_length=1)] = "id"

    @field_validator("image", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ShardsSpec(Strict):
    """WebDataset tar shards under <output>/shards/ (shards.py): each worker fills its own."""

    size: Annotated[int, Field(gt=0)] = 1000  # samples per shard; a worker's last shard holds what is left


class NotifySpec(Strict):
    # The run's summary JSON is POSTed here when it ends (notify.py). Treated as a secret: no
    # log, record or error message shows more of it than scheme and host.
    webhook: str

    @field_validator("webhook")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("is not an http(s) URL; write it as https://host/path")
        return url


class JobSpec(Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    manifest: str
    # Folder that relative paths in the manifest resolve against; default: the manifest's own.
    # `svd-batch submit` sets it when it ships a local manifest to the cluster.
    manifest_base: str | None = None
    output: str
    metadata: str | None = None  # default: <output>/metadata
    model: ModelSpec
    defaults: RenderParams = RenderParams()
    formats: list[Format] = [Format.mp4]  # loose files; none with `shards` for shards alone
    workers: WorkersSpec = WorkersSpec()
    inputs: InputsSpec = InputsSpec()
    samples: SamplesSpec = SamplesSpec()
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    # Dataset synthesis: every row becomes one row per combination of these values.
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    # Every row's gates; a row's own `quality` overrides them gate by gate.
    quality: QualityGates | None = None
    notify: NotifySpec | None = None
    shards: ShardsSpec | None = None
    # Manifest columns to carry into each metadata row's `passthrough` (JSON), e.g. a source URL.
    passthrough: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    # One run holds an output at a time; a holder silent for this long is taken over (ledger.py).
    lease_ttl_s: Annotated[float, Field(ge=10)] = 120.0
    # How often the driver commits finished rows as a metadata part: a driver killed between
    # commits costs at most this long's rows (their videos are rendered again by the rerun);
    # shorter writes more, smaller parts, which compaction merges.
    commit_every_s: Annotated[float, Field(ge=1, le=3600)] = COMMIT_EVERY_S
    # Seconds per video of a simulated device in place of the pipeline (engine/simulated.py);
    # `svd-batch run --simulate`. Such a job writes under <output>/simulated/ (`simulated()`).
    simulate: Annotated[float, Field(gt=0, le=3600)] | None = None

    @field_validator("sweep")
    @classmethod
    def _sweepable(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        checked = {}
        for name, values in sweep.items():
            if name != "seed" and name not in RenderParams.model_fields:
                raise ValueError(f"sweep key '{name}' is not a render parameter{did_you_mean(name, RenderParams)}")
            if not values:
                raise ValueError(f"sweep key '{name}' needs at least one value")
            checked[name] = [_as_row_value(name, i, value) for i, value in enumerate(values)]
        return checked

    @field_validator("passthrough")
    @classmethod
    def _carried(cls, names: list[str]) -> list[str]:
        for name in names:
            if name in ManifestRow.model_fields:
                raise ValueError(f"'{name}' is a column svd-batch reads itself; list only other columns")
        if len(set(names)) < len(names):
            raise ValueError("a column is listed twice; list each once")
        return names

    @model_validator(mode="after")
    def _outputs(self) -> JobSpec:
        if not self.formats and self.shards is None:
            raise ValueError("formats: the job would make nothing; list a format (mp4, gif, webp, png) or set shards")
        return self

    @property
    def made(self) -> list[str]:
        """What a done key has committed: every format, and its shard (the `<name>_uri` columns)."""
        return [*self.formats, *(["shard"] if self.shards else [])]

    def as_run(self) -> JobSpec:
        """The job as it runs: on simulated devices where it says `simulate`."""
        return self if self.simulate is None else self.simulated(self.simulate)

    def simulated(self, seconds: float) -> JobSpec:
        """The job on simulated devices: everything it writes (videos, shards, metadata, run
        records, report) goes under <output>/simulated/, never beside real outputs."""
        output = self.output.rstrip("/") + "/simulated"
        return self.model_copy(update={"simulate": seconds, "output": output, "metadata": None})

    @property
    def metadata_uri(self) -> str:
        return self.metadata or metadata_location(self.output)

    @property
    def runs_uri(self) -> str:
        return runs_location(self.metadata_uri)


def _as_row_value(name: str, index: int, value: Any) -> Any:
    """A sweep value, checked exactly as the same value in a manifest row would be."""
    try:
        row = ManifestRow.model_validate({"id": "sweep", "image": "sweep", name: value})
    except ValidationError as exc:
        raise ValueError(f"sweep.{name}[{index}]: {explain(exc, ManifestRow)[0][1]}") from None
    return getattr(row, name)


def metadata_location(output: str) -> str:
    """Where a job's metadata goes unless its spec says otherwise."""
    return output.rstrip("/") + "/metadata"


def runs_location(metadata_uri: str) -> str:
    """Where the run records go: `runs/` beside the metadata folder (not in it, so the folder
    stays one Parquet dataset for pyarrow, pandas and duckdb)."""
    if metadata_uri.startswith("s3://"):
        bucket, key = split_s3(metadata_uri.rstrip("/"))
        parent = posixpath.dirname(key)
        return f"s3://{bucket}/{parent}/runs" if parent else f"s3://{bucket}/runs"
    return posixpath.join(posixpath.dirname(metadata_uri.rstrip("/")), "runs")


class WorkItem(BaseModel):
    """One video to make: what planning hands a worker, as a row of WORK_SCHEMA."""

    job: str
    run_id: str
    line: int  # in the manifest, for error messages
    id: str
    video_index: int
    key: str
    image: str  # resolved: absolute path or s3:// URI; of a dataset manifest's row, what names its bytes
    image_bytes: bytes | None = Field(None, repr=False)  # a dataset manifest's image (samples.py)
    seed: int
    params: RenderParams
    tags: str | None = None
    caption: str | None = None
    passthrough: str | None = None  # JSON, as ResultRow's
    # URIs of the formats an earlier run already made (`mp4_uri` -> ...): only the others are written.
    kept: dict[str, str] = Field(default_factory=dict)
    # A row that cannot be planned travels as an item with only this (and no params), so that
    # its failed row is committed with every other row: the worker passes it on, unrendered.
    error: str | None = None


class Status(StrEnum):
    """What a run produced for a key. Rows it did not touch (done earlier, or left by a stop)
    are counted in the run's record, never written as rows."""

    ok = "ok"
    failed = "failed"
    rejected = "rejected"  # rendered max_tries times and never met its quality gates: done


class Stage(StrEnum):
    """Where a row failed: the `error_stage` column."""

    manifest = "manifest"  # the row itself is invalid (parsing, fields, references)
    params = "params"  # its parameters do not fit the model
    image = "image"
    latents = "latents"
    render = "render"
    score = "score"  # measuring the frames (scores.py)
    output = "output"  # encoding or upload
    worker = "worker"  # its worker died, timed out or never got to it


class TryRecord(BaseModel):
    seed: int
    scores: ClipScores
    failed_gates: list[str]


class ResultRow(BaseModel):
    """One metadata row per output video; its fields are the Parquet columns."""

    model_config = ConfigDict(use_enum_values=True)

    job: str
    run_id: str
    id: str
    video_index: int
    key: str  # deterministic output key (without extension); the resume index
    status: Status
    error: str | None = None  # one line: row, field, reason and the fix
    error_stage: Stage | None = None
    error_type: str | None = None  # e.g. ImageError, StorageError, WorkerDied, RowTimeout, Stalled
    # A failure of the moment (worker death, stall, timeout, storage, memory), not of the row:
    # the next plain run renders it again. Final failures wait for --retry-failed.
    retryable: bool | None = None
    mp4_uri: str | None = None
    gif_uri: str | None = None
    webp_uri: str | None = None
    png_uri: str | None = None  # prefix of the numbered frame files
    # The committed WebDataset shard holding this clip, and its sample key there (shards.py).
    shard_uri: str | None = None
    shard_member: str | None = None
    seed: int | None = None
    params: RenderParams | None = None
    image: str
    input_width: int | None = None
    input_height: int | None = None
    input_sha256: str | None = None
    model_path: str | None = None
    model_sha256: str | None = None
    load_s: float | None = None
    # The worker's peak resident memory once its model is loaded, on its first row: what a
    # worker really holds, beside the estimate it asked Ray for.
    load_peak_rss_mb: float | None = None
    denoise_s: float | None = None
    decode_s: float | None = None
    # This video's share of its device calls (pipeline and image encoder, every try), and when
    # its last one began and ended: what the report's worker lanes draw.
    device_s: float | None = None
    device_started_at: dt.datetime | None = None
    device_ended_at: dt.datetime | None = None
    encode_s: float | None = None
    upload_s: float | None = None
    # The clip's scores (scores.py; units in docs/datasets.md), measured on its frames before encoding.
    score_motion: float | None = None
    score_flicker: float | None = None
    score_sharpness: float | None = None
    score_fidelity: float | None = None
    score_consistency: float | None = None
    score_s: float | None = None
    # A gated row (params.quality): how many seeds it took, each try's scores, and the gates the
    # kept try missed (none for ok). `seed` is then the kept try's.
    tries: int | None = None
    try_scores: list[TryRecord] | None = None
    failed_gates: list[str] | None = None
    node: str | None = None  # host / Ray node id
    device: str | None = None
    dtype: str | None = None  # what the video was computed in: the model's, or fp32 after a retry
    recovery: str | None = None  # what it took to make this video, when the first try failed
    worker: str | None = None  # the worker (Ray actor) that made it
    attempt: int = 1
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    tags: str | None = None  # JSON: free-form keys differ per row, so one column holds them
    caption: str | None = None
    passthrough: str | None = None  # JSON of the spec's passthrough columns: their names differ per job

    @classmethod
    def for_item(cls, item: WorkItem, status: Status, **fields: Any) -> ResultRow:
        """The one factory of result rows. Every value comes from a validated work item (or
        the driver's own accounting), so validation is skipped."""
        return cls.model_construct(
            job=item.job,
            run_id=item.run_id,
            id=item.id,
            video_index=item.video_index,
            key=item.key,
            status=status,
            seed=item.seed,
            params=item.params,
            image=item.image,
            tags=item.tags,
            caption=item.caption,
            passthrough=item.passthrough,
            **fields,
        )


class RunRecord(BaseModel):
    """`runs/<run_id>.json` beside the metadata: one per run, what it was and what it did."""

    job: str
    run_id: str
    # lost: it ended without writing its end (killed, or its machine lost); the run that took
    # over its lease wrote this, with its last heartbeat as ended_at.
    state: Literal["running", "finished", "stopped", "failed", "lost"]
    exit_code: int | None = None
    spec_sha256: str  # of the spec as the run read it (paths resolved)
    model_fingerprint: str
    versions: dict[str, str]
    host: str
    pid: int
    # ok / failed: rows this run produced; skipped: done (or failed for good) before it;
    # left: planned but not started when a deadline or signal stopped it.
    counts: dict[str, int] = Field(default_factory=dict)
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    stopped: str | None = None
    stalled: str | None = None
    # Over the run's worker processes: the mean share of their wall time since their first call
    # that their devices computed, and the most frames one held for its CPU work.
    device_busy: float | None = None
    frames_peak_mb: float | None = None
    # CPU seconds per video made (ok or rejected), by stage: score, encode, upload.
    cpu_s_per_video: dict[str, float] = Field(default_factory=dict)


class LeaseRecord(BaseModel):
    """`_lease/<generation>.json` under the metadata prefix: which run holds the output."""

    run_id: str
    host: str
    pid: int
    ttl_s: float
    acquired_at: dt.datetime
    heartbeat_at: dt.datetime
    released: bool = False


def _arrow_type(annotation: Any) -> pa.DataType:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (Union, types.UnionType):
        if len(args) != 1:
            raise TypeError(f"cannot derive an Arrow type for {annotation}")
        return _arrow_type(args[0])
    if origin is Annotated:
        return _arrow_type(args[0])
    if origin is Literal:
        return pa.string()
    if origin is list:
        return pa.list_(_arrow_type(args[0]))
    if origin is dict:
        return pa.map_(_arrow_type(args[0]), _arrow_type(args[1]))
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return pa.struct([pa.field(n, _arrow_type(f.annotation)) for n, f in annotation.model_fields.items()])
        if issubclass(annotation, Enum) or issubclass(annotation, (str, Path)):
            return pa.string()
        if issubclass(annotation, bytes):
            return pa.binary()
        if issubclass(annotation, bool):
            return pa.bool_()
        if issubclass(annotation, int):
            return pa.int64()
        if issubclass(annotation, float):
            return pa.float64()
        if issubclass(annotation, dt.datetime):
            return pa.timestamp("us", tz="UTC")
    raise TypeError(f"cannot derive an Arrow type for {annotation}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema([pa.field(name, _arrow_type(f.annotation)) for name, f in model.model_fields.items()])


RESULT_SCHEMA = arrow_schema(ResultRow)
WORK_SCHEMA = arrow_schema(WorkItem)


def did_you_mean(name: str, model: type[BaseModel]) -> str:
    fields = [n for n, f in model.model_fields.items() if f.json_schema_extra != {"column": False}]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(fields)}"


def explain(error: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """(field, reason with a fix) for each problem pydantic found."""
    problems = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(row)"
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, item["loc"][:-1])
            reason = f"unknown field{did_you_mean(str(item['loc'][-1]), owner)}"
        else:
            reason = item["msg"]
            if item["type"] not in ("value_error", "assertion_error") and "input" in item:
                reason += f" (got {item['input']!r:.60})"
        problems.append((field, reason))
    return problems


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = field.annotation
        candidates = [a for a in typing.get_args(inner) if isinstance(a, type)] or [inner]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model

"""Issue 7: hostile inputs, one case at a time, against the code that meets them first."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mindspore
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from svd_batch.driver import Job, load_spec
from svd_batch.engine import simulated
from svd_batch.images import ImageError, load_image
from svd_batch.manifest import MAX_ROW_CHARS, read_rows
from svd_batch.plan import Planner, RowError
from svd_batch.schema import JobSpec, ManifestRow, WorkItem
from svd_batch.storage import StorageError, read_uri
from svd_batch.worker import RowWorker
from tests.helpers import FAST, SIMULATE, cli, make_image, results, write_images, write_job


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_images(folder)


def _load(path: Path, size: int = 32, fit: str = "crop"):  # type: ignore[no-untyped-def]
    return load_image(read_uri(str(path)), size, size, fit)


def test_every_image_renders_or_is_refused_with_its_reason(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = images
    for name, refusal in expected.items():
        if refusal is None:
            loaded = _load(folder / name)
            assert loaded.image.mode == "RGB" and loaded.image.size == (32, 32), name
        else:
            with pytest.raises((ImageError, StorageError), match=re.escape(refusal)):
                _load(folder / name)


def test_decompression_bomb_is_refused_before_decoding(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    data = (folder / "bomb.png").read_bytes()
    assert len(data) < 200_000  # 900 megapixels behind it
    # The size comes from the PNG header: the refusal happens at open, before any pixel is decoded.
    with pytest.raises(ImageError, match="900000000 pixels"):
        load_image(data, 32, 32, "crop")


def test_16bit_values_are_scaled_not_clipped(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    pixels = np.asarray(_load(folder / "16bit.png", fit="stretch").image)
    # A 16-bit ramp clipped at 255 would be almost all white; scaled, it spans the range.
    assert pixels.min() < 30 and pixels.max() > 200 and 60 < pixels.mean() < 200


def test_cmyk_and_gray_come_out_as_their_rgb_colours(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    plain = np.asarray(_load(folder / "plain.png").image).astype(int)
    cmyk = np.asarray(_load(folder / "cmyk.jpg").image).astype(int)
    assert np.abs(cmyk - plain).mean() < 12  # JPEG loss only
    gray = np.asarray(_load(folder / "gray.png").image)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_alpha_is_composited_on_black(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    pixels = np.asarray(_load(folder / "alpha.png", fit="stretch").image).astype(int)
    # The alpha gradient runs top (transparent) to bottom (opaque).
    assert pixels[0].mean() < 15 and pixels[-1].mean() > pixels[0].mean() + 40


def test_exif_rotation_is_applied(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    loaded = _load(folder / "exif.jpg")
    assert (loaded.width, loaded.height) == (40, 48)  # stored 48x40, shown upright


def test_animated_gif_uses_its_first_frame(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    red, green, blue = np.asarray(_load(folder / "animated.gif").image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 50 and green < 50


def test_tiny_and_very_wide_images_fill_the_frame(images: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = images
    one = np.asarray(_load(folder / "1x1.png").image)
    assert (one == one[0, 0]).all() and tuple(one[0, 0]) == (10, 200, 30)
    for fit in ("crop", "pad", "stretch"):
        assert _load(folder / "wide.png", fit=fit).image.size == (32, 32)


def _read_as_nobody(uri: str, answer: multiprocessing.Queue) -> None:
    os.setuid(65534)
    try:
        read_uri(uri)
        answer.put("read")
    except StorageError as exc:
        answer.put(str(exc))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_unreadable_file_names_the_permission(tmp_path: Path) -> None:
    # root reads any file, so read as `nobody`, like a worker whose image was not shared with it.
    secret = tmp_path / "private.png"
    Image.new("RGB", (4, 4)).save(secret)
    secret.chmod(0o600)
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    child = context.Process(target=_read_as_nobody, args=(str(secret), answer))
    child.start()
    child.join(timeout=60)
    assert "not readable (permission denied); fix its permissions" in answer.get(timeout=5)


def _manifest(path: Path, text: str) -> list[ManifestRow | RowError]:
    path.write_text(text, newline="")
    return [row for _, row in read_rows(str(path))]


def test_a_huge_row_is_refused_and_the_rows_after_it_still_read(tmp_path: Path) -> None:
    huge = "x" * (MAX_ROW_CHARS * 3)
    rows = _manifest(
        tmp_path / "m.jsonl",
        '{"id": "a", "image": "a.png"}\r\n'
        + json.dumps({"id": "big", "image": "b.png", "tags": {"caption": huge}})
        + '\n{"id": "c", "image": "c.png"}\r{"id": "d", "image": "d.png"}',
    )
    assert [getattr(r, "id", None) for r in rows] == ["a", None, "c", "d"]
    assert isinstance(rows[1], RowError) and rows[1].line == 2 and "larger than 65,536 characters" in str(rows[1])
    rows = _manifest(tmp_path / "m.csv", f'id,image,tags\na,a.png,\nbig,b.png,"{huge}"\r\nc,c.png,\n')
    assert [getattr(r, "id", None) for r in rows] == ["a", None, "c"]
    assert isinstance(rows[1], RowError) and rows[1].line == 3


EMPTY = ("manifest.jsonl", "\n\n", "has no rows; add one JSON object (or CSV/Parquet row) per input image")
UNREADABLE = (
    "manifest.parquet",
    "id,image\n",
    "is not a Parquet file (Parquet magic bytes not found in footer. Either ",
)


@pytest.mark.parametrize(
    ("command", "name", "content", "error"),
    [("validate", *EMPTY), ("run", *EMPTY), ("validate", *UNREADABLE), ("run", *UNREADABLE)],
)
def test_an_empty_or_unreadable_manifest_stops_the_job_with_one_line(
    tmp_path: Path, tiny_model: Path, request: pytest.FixtureRequest, command: str, name: str, content: str, error: str
) -> None:
    """`run` on the session's cluster: the line is the planner's, whichever cluster it runs on."""
    spec = tmp_path / "job.yaml"
    (tmp_path / name).write_text(content)
    spec.write_text(f"name: e\nmanifest: {name}\noutput: out\nmodel: {{path: {tiny_model}}}\n")
    on = []
    if command == "run":
        on = ["--address", request.getfixturevalue("ray_cluster").get_runtime_context().gcs_address]
    done = cli(command, str(spec), *on)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: manifest {tmp_path / name} {error}")


PATH_IDS = ["../../escape", "/etc/escape", "L" * 1000, "caf\u00e9", "cafe\u0301"]
BAD_ROWS = {  # id: (extra row fields, the field and fix its error must name)
    "zero-height": ({"height": 0}, "height: Input should be greater than 0 (got 0)"),
    "negative-width": ({"width": -8}, "width: Input should be greater than 0 (got -8)"),
    "odd-height": ({"height": 36}, "height: Input should be a multiple of 8 (got 36)"),
    "too-tall": ({"height": 4104}, "height: Input should be less than or equal to 4096 (got 4104)"),
    "many-sigmas": ({"sigmas": [1.0] * 1001}, "sigmas: List should have at most 1000 items after validation"),
    "too-many-frames": (
        {"num_frames": simulated.NUM_FRAMES + 1},
        f"params: ValueError: num_frames {simulated.NUM_FRAMES + 1} is more than the {simulated.NUM_FRAMES}",
    ),
    "out-of-range": ({"motion_bucket_id": 5000}, "motion_bucket_id: Input should be less than or equal to 1023"),
    "wrong-type": ({"num_inference_steps": "many"}, "num_inference_steps: Input should be a valid integer"),
    "unknown-field": ({"motion_bukcet_id": 3}, "motion_bukcet_id: unknown field; did you mean 'motion_bucket_id'?"),
    "nul\x00byte": ({}, "id: Value error, id contains a NUL byte; use printable characters"),
    "x" * 1025: ({}, "id: String should have at most 1024 characters"),
    "pickled-latents": (
        {"latents": "evil.npy"},
        "latents: ValueError: Object arrays cannot be loaded when allow_pickle=False",
    ),
}


class Marker:
    """Unpickling it creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_cluster: object) -> Path:
    """On simulated devices: what meets a hostile row (manifest, paths, images, parameters, the
    clip length the model allows) is the system's own code, never the model's."""
    folder = tmp_path_factory.mktemp("hostile-job")
    expected = write_images(folder / "img")
    rows = [{"id": f"img-{name}", "image": f"img/{name}"} for name in expected]
    rows += [{"id": row_id, "image": "img/plain.png"} for row_id in PATH_IDS]
    rows += [{"id": row_id, "image": "img/plain.png", **extra} for row_id, (extra, _) in BAD_ROWS.items()]
    # Initial latents are a .npy file; one holding a pickle would run code as it loads.
    np.save(folder / "evil.npy", np.array([Marker(folder / "pwned")], dtype=object), allow_pickle=True)
    spec = write_job(folder, rows, tiny_model, workers={"count": 2, "batch_size": 4}, simulate=SIMULATE)
    counts = Job(load_spec(spec)).run()
    assert counts == Counter(
        ok=sum(v is None for v in expected.values()) + len(PATH_IDS),
        failed=sum(v is not None for v in expected.values()) + len(BAD_ROWS),
    )
    return spec


def test_every_good_row_is_ok_and_every_bad_row_says_why(hostile_job: Path) -> None:
    df = results(hostile_job).set_index("id")
    for line, (name, refusal) in enumerate(write_images(hostile_job.parent / "check").items(), start=1):
        row = df.loc[f"img-{name}"]
        if refusal is None:
            assert row.status == "ok", (name, row.error)
        else:
            assert row.status == "failed" and row.error.startswith(f"row {line} (id 'img-{name}'): image: ")
            assert refusal in row.error, row.error
    for row_id in PATH_IDS:
        assert df.loc[row_id, "status"] == "ok"
    for row_id, (_, reason) in BAD_ROWS.items():
        error = df.loc[row_id, "error"]
        assert df.loc[row_id, "status"] == "failed" and reason in error, error
    assert not (hostile_job.parent / "pwned").exists()


def test_nothing_is_written_outside_the_output_and_no_two_rows_share_a_file(hostile_job: Path) -> None:
    folder = hostile_job.parent
    df = results(hostile_job)
    ok = df[df.status == "ok"]
    videos = {Path(uri.removeprefix("file://")) for uri in ok.mp4_uri}
    assert len(videos) == len(ok)  # the two spellings of "café" included
    outputs = Path(load_spec(hostile_job).output)
    on_disk = {p for p in (outputs / "videos").rglob("*") if p.is_file()}
    assert on_disk == videos  # metadata matches storage: no orphan, no temporary file, nothing missing
    written = {p for p in folder.rglob("*") if p.is_file() and folder / "outputs" not in p.parents}
    inputs = {folder / "job.yaml", folder / "manifest.jsonl", folder / "evil.npy"} | set((folder / "img").rglob("*"))
    assert written <= inputs | set((folder / "check").rglob("*"))
    assert not Path("/etc/escape.mp4").exists() and not any(folder.parent.glob("escape*"))
    assert all(len(p.name) < 255 for p in videos)


def _model_variant(tiny_model: Path, folder: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """The tiny model with its VAE weights changed: a real checkpoint that misbehaves."""
    shutil.copytree(tiny_model, folder)
    weights_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    change(weights)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return folder


def _worker(model: Path, out: Path, dtype: str, **params: object) -> tuple[RowWorker, list[WorkItem]]:
    spec = JobSpec.model_validate(
        {
            "name": "t",
            "manifest": str(out.parent / "manifest.jsonl"),  # the inputs are beside it
            "output": str(out),
            "defaults": {**FAST, **params},
            "formats": ["mp4"],
            "model": {"path": str(model), "dtype": dtype},
            "workers": {"batch_size": 2},
        }
    )
    planner = Planner(spec, str(out / "-"), "t", "weights")
    images = [make_image(out.parent / f"in-{seed}.png", seed=seed) for seed in (1, 2)]
    rows = [ManifestRow(id=f"r{n}", image=str(image)) for n, image in enumerate(images, start=1)]
    return RowWorker(spec), [planner.resolve(row, n)[0].work_item() for n, row in enumerate(rows, start=1)]


def _overflows_fp16(weights: dict[str, np.ndarray]) -> None:
    # Activations of 65000 + x after the decoder's first conv: they overflow float16 (max 65504)
    # in the layers after it, and are harmless in float32, where every group norm removes them.
    weights["decoder.conv_in.bias"][:] = 65000.0


def _black(weights: dict[str, np.ndarray]) -> None:
    weights["decoder.time_conv_out.bias"][:] = -100.0


def test_nan_frames_in_fp16_are_rendered_again_in_fp32(tiny_model: Path, tmp_path: Path) -> None:
    worker, items = _worker(_model_variant(tiny_model, tmp_path / "m", _overflows_fp16), tmp_path / "out", "fp16")
    rows = worker.process(items)
    for row in rows:
        assert row.status == "ok", row.error
        assert row.dtype == "fp32"
        assert row.recovery == "the pipeline produced NaN/inf frames in fp16; rendered again in fp32"
        assert Path(row.mp4_uri.removeprefix("file://")).stat().st_size > 0
    # the model went back to float16 for the rows after
    assert {p.dtype for p in worker.model.pipe.unet.get_parameters()} == {mindspore.float16}


@pytest.mark.slow
def test_black_frames_fail_after_the_fp32_retry_and_are_never_encoded(tiny_model: Path, tmp_path: Path) -> None:
    """`make test` renders bad fp16 frames again in fp32 in
    test_nan_frames_in_fp16_are_rendered_again_in_fp32; this one also fails the row when fp32 is bad
    too."""
    model = _model_variant(tiny_model, tmp_path / "m", _black)
    for dtype, reason in (
        ("fp16", "render: OutputError: every frame is black; again in fp32: every frame is black"),
        ("fp32", "render: OutputError: every frame is black"),  # fp32 would only compute the same again
    ):
        worker, items = _worker(model, tmp_path / dtype, dtype)
        for row in worker.process(items):
            line = int(row.id[1:])
            assert row.status == "failed" and row.error == f"row {line} (id {row.id!r}): {reason}"
        assert not (tmp_path / dtype / "videos").exists()


def test_out_of_memory_in_decode_halves_the_chunk_and_records_it(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MindSpore on CPU aborts the whole process on std::bad_alloc (measured: RLIMIT_AS below a
    # decode's need ends in `terminate called after throwing std::bad_alloc`), so the error an
    # Ascend device raises is injected at the VAE; the decode itself is the real one.
    worker, items = _worker(tiny_model, tmp_path / "out", "fp32", decode_chunk_size=4)
    vae = worker.model.pipe.vae
    real_decode, chunks = vae.decode, []

    def decode(latents, *args, **kwargs):  # type: ignore[no-untyped-def]
        chunks.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise RuntimeError("Out of Memory!!! Request memory size: 1073741824B, Memory Statistic: ...")
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    rows = worker.process(items[:1])
    assert rows[0].status == "ok", rows[0].error
    assert rows[0].params.decode_chunk_size == 1 and chunks[:3] == [4, 2, 1]
    assert rows[0].recovery == "out of memory in decode; decode_chunk_size 4 -> 1"

    def broken(latents, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(vae, "decode", broken)
    row = worker.process(items[1:])[0]
    assert row.status == "failed" and row.error.endswith("render: RuntimeError: kernel launch failed")


def test_rows_read_only_allowed_regular_files_of_bounded_size(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    folder = tmp_path / "job"
    make_image(folder / "img" / "ok.png")
    make_image(folder / "big" / "large.png", size=(400, 300))  # ~350 kB: above the cap below
    os.mkfifo(folder / "img" / "pipe.png")  # a reader that opened it would wait for a writer forever
    (folder / "img" / "link.png").symlink_to("/etc/hostname")  # inside the folder, leading out of it
    rows = {
        "ok": "img/ok.png",
        "ssh-key": "/root/.ssh/id_rsa",
        "shadow": "file:///etc/shadow",
        "other-bucket": "s3://other-bucket/x.png",
        "climbs-out": "img/../../../etc/passwd",
        "zero": "/dev/zero",
        "fifo": "img/pipe.png",
        "symlink-out": "img/link.png",
        "large": "big/large.png",
    }
    spec = write_job(
        folder,
        [{"id": row_id, "image": image} for row_id, image in rows.items()],
        tiny_model,
        inputs={"allow": [".", "/dev"], "max_bytes": 100_000},
        simulate=SIMULATE,  # what a worker reads is its own logic, not the model's
    )
    assert Job(load_spec(spec)).run() == Counter(ok=1, failed=len(rows) - 1)
    df = results(spec).set_index("id")
    assert df.loc["ok", "status"] == "ok"
    refused = {  # row: what its error says, planned (as written) or read (the real path)
        "ssh-key": "image: /root/.ssh/id_rsa is outside inputs.allow",
        "shadow": "image: file:///etc/shadow is outside inputs.allow",
        "other-bucket": "image: s3://other-bucket/x.png is outside inputs.allow",
        "climbs-out": f"image: {tmp_path.parent}/etc/passwd is outside inputs.allow",
        "zero": "image: InputError: /dev/zero is a device, FIFO or socket, not a regular file",
        "fifo": f"image: InputError: {folder}/img/pipe.png is a device, FIFO or socket, not a regular file",
        "symlink-out": f"image: InputError: {folder}/img/link.png is outside inputs.allow",
        "large": "large.png is 0.3 MiB, above inputs.max_bytes (0.1 MiB); shrink the file or raise inputs.max_bytes",
    }
    for row_id, phrase in refused.items():
        error = df.loc[row_id, "error"]
        assert df.loc[row_id, "status"] == "failed" and phrase in error, error
    assert "add '/root/.ssh' to inputs.allow in the job spec" in df.loc["ssh-key", "error"]
    assert "add 's3://other-bucket' to inputs.allow" in df.loc["other-bucket", "error"]
    # The same words whether the file exists (/etc/shadow) or not (an ssh key here): nothing leaks.
    shadow = df.loc["shadow", "error"].split(": ", 2)[2].replace("file:///etc/shadow", "X").replace("/etc", "D")
    ssh = df.loc["ssh-key", "error"].split(": ", 2)[2].replace("/root/.ssh/id_rsa", "X").replace("/root/.ssh", "D")
    assert shadow == ssh

"""Manifests as datasets come (samples.py): WebDataset shards, written by webdataset's own
TarWriter, and Parquet image columns in the Hugging Face layout, rendered from the bytes they
hold, with their captions through to the metadata and the output shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from svd_batch import samples
from svd_batch.driver import Job, load_spec
from svd_batch.manifest import read_rows
from svd_batch.plan import RowError
from svd_batch.samples import Reading
from svd_batch.schema import ManifestRow, SamplesSpec
from tests.helpers import make_image, results, run_job, write_job

SHARDS, PER_SHARD = 4, 8
NO_IMAGE, BAD_JSON = ("00001", "000000010"), ("00002", "000000019")  # (shard, key) of the two bad samples


def _write_shards(folder: Path) -> list[Path]:
    """4 shards of 8 samples as img2dataset writes them: a jpg or png, a txt caption and a json
    (a source URL to carry, and a seed); one sample has no image, one json an invalid height."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [make_image(folder / f"src{i}.png", seed=i).read_bytes() for i in range(4)]
    paths = []
    for shard in range(SHARDS):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(PER_SHARD):
                n = shard * PER_SHARD + index
                key = f"{n:09d}"
                sample: dict[str, object] = {"__key__": key, "txt": f"caption {n}"}
                # img2dataset's own fields (key, status, the image's width and height) are left unread.
                sample["json"] = {"url": f"https://example.com/{n}.jpg", "seed": n, "key": key, "status": "success"}
                sample["json"] |= {"width": 37, "height": 41}
                if (f"{shard:05d}", key) == BAD_JSON:
                    sample["json"] = {"url": "u", "num_frames": 0}
                if (f"{shard:05d}", key) != NO_IMAGE:
                    sample["png" if n % 2 else "jpg"] = images[n % 4]  # bytes as they are, either format
                sink.write(sample)
        paths.append(path)
    return paths


def _check_job(spec: Path) -> None:
    """The promise of a dataset manifest: 30 videos with their captions and URLs in the metadata
    and in the output shards, the 2 bad samples failed naming shard and key, a rerun renders
    nothing. A run stopped before it starts leaves every shard unread (a deadline must not
    read a whole dataset to count what it leaves)."""
    stopped = Job(load_spec(spec), max_duration=0)
    assert stopped.run() == Counter() and stopped.unread_shards == SHARDS
    assert run_job(spec) == Counter(ok=PER_SHARD * SHARDS - 2, failed=2)
    df = results(spec).set_index("id")
    ok = df[df.status == "ok"]
    assert len(ok) == 30 and all(ok.caption == [f"caption {int(i.split('/')[1])}" for i in ok.index])
    assert all(json.loads(p)["url"].endswith(f"/{int(i.split('/')[1])}.jpg") for i, p in ok.passthrough.items())
    assert ok.image.str.contains(r"\.tar#\d{9}\.(jpg|png)$").all() and ok.input_sha256.notna().all()
    failed = df[df.status == "failed"]
    missing, invalid = (failed.loc[f"{s}/{k}", "error"] for s, k in (NO_IMAGE, BAD_JSON))
    assert "00001.tar, sample 000000010" in missing and "no image member" in missing
    assert "num_frames" in invalid and "00002.tar#000000019" in invalid
    samples = []
    for uri in set(ok.shard_uri):
        data = _s3_bytes(uri) if uri.startswith("s3://") else Path(uri.removeprefix("file://")).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            samples += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]  # type: ignore[arg-type]
    assert sorted(s["caption"] for s in samples) == sorted(ok.caption)
    assert all(s["passthrough"]["url"].startswith("https://example.com/") for s in samples)
    assert run_job(spec) == Counter(skipped=30, failed=2)  # the bad samples fail again; nothing renders


def _s3_bytes(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _shards_job(folder: Path, model: Path, **where: str) -> Path:
    """A job over the shards `where` names, writing output shards, on fast simulated devices."""
    job = {"passthrough": ["url"], "shards": {"size": 8}, "workers": {"count": 2, "batch_size": 4}}
    return write_job(folder, [], model, simulate=0.05, **job, **where)


def test_webdataset_shards_render_with_their_captions_and_a_rerun_renders_nothing(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    _write_shards(tmp_path / "job" / "laion")
    _check_job(_shards_job(tmp_path / "job", tiny_model, manifest="laion/{00000..00003}.tar"))


@pytest.mark.slow
def test_webdataset_shards_on_s3_render_as_local_ones(
    tmp_path: Path, tiny_model: Path, s3_server: str, ray_cluster: object
) -> None:
    """`make test` reads S3 shards row for row as local ones in
    test_a_shard_on_s3_reads_as_the_same_file_does_and_a_cut_shard_fails_from_where_it_ends."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="wds-in")
    s3.create_bucket(Bucket="wds-out")
    for path in _write_shards(tmp_path / "shards"):
        s3.upload_file(str(path), "wds-in", f"laion/{path.name}")
    manifest = "s3://wds-in/laion/{00000..00003}.tar"
    _check_job(_shards_job(tmp_path / "job", tiny_model, manifest=manifest, output="s3://wds-out/run"))


def _rows(manifest: str, **reading: object) -> list[ManifestRow | RowError]:
    return [row for _, row in read_rows(manifest, ["url"], Reading(**reading))]  # type: ignore[arg-type]


def test_a_shard_on_s3_reads_as_the_same_file_does_and_a_cut_shard_fails_from_where_it_ends(
    tmp_path: Path, s3_server: str
) -> None:
    paths = _write_shards(tmp_path)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="wds-read")
    for path in paths:
        s3.upload_file(str(path), "wds-read", f"d/{path.name}")
    local = _rows(str(tmp_path / "{00000..00003}.tar"), base=str(tmp_path))
    remote = _rows("s3://wds-read/d/*.tar", base="s3://wds-read/d")
    assert len(local) == len(remote) == 32
    for mine, theirs in zip(local, remote, strict=True):
        assert type(mine) is type(theirs)
        if isinstance(mine, ManifestRow):
            assert isinstance(theirs, ManifestRow)
            assert (mine.id, mine.caption, mine.image_bytes, mine.seed) == (
                theirs.id,
                theirs.caption,
                theirs.image_bytes,
                theirs.seed,
            )
            assert theirs.image.startswith("s3://wds-read/d/") and mine.image.startswith(str(tmp_path))
    # A shard cut mid-way: what it holds before the cut renders, the sample it was in fails and
    # says the rest were not read; the other shards are untouched.
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2 + 100])
    cut = _rows(str(tmp_path), base=str(tmp_path))
    last = [r for r in cut if isinstance(r, RowError)][-1]
    assert "00003.tar could not be read to its end" in last.reason and "were not read" in last.reason
    whole = [r for r in cut if isinstance(r, ManifestRow) and r.id.startswith("00003/")]
    assert 0 < len(whole) < PER_SHARD and len(cut) == 3 * PER_SHARD + len(whole) + 1


def test_a_parquet_manifest_of_image_bytes_renders_them_and_a_rerun_renders_nothing(
    tmp_path: Path, tiny_model: Path, s3_server: str, ray_cluster: object
) -> None:
    """The Hugging Face layout: `image` a struct {bytes, path}, the id in a column the spec names;
    on S3 (ranged reads) it reads row for row as the local file."""
    images = [make_image(tmp_path / f"{i}.png", seed=i).read_bytes() for i in range(6)]
    cells = [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)]
    cells.append({"bytes": None, "path": None})  # a row without its image
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(7)],
            "image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "caption": [f"a picture {i}" for i in range(7)],
        }
    )
    (tmp_path / "job").mkdir()
    pq.write_table(table, tmp_path / "job" / "train.parquet", row_group_size=3)
    spec = write_job(tmp_path / "job", [], tiny_model, manifest="train.parquet", samples={"id": "uid"}, simulate=0.05)
    assert run_job(spec) == Counter(ok=6, failed=1)
    df = results(spec).set_index("id")
    assert df.loc["u6", "status"] == "failed" and "image" in df.loc["u6", "error"]
    ok = df[df.status == "ok"].sort_index()
    assert list(ok.caption) == [f"a picture {i}" for i in range(6)]
    assert all(image.endswith(f"train.parquet#{i}") for i, image in ok.image.items())
    assert run_job(spec) == Counter(skipped=6, failed=1)
    boto3.client("s3").create_bucket(Bucket="hf-in")
    boto3.client("s3").upload_file(str(tmp_path / "job" / "train.parquet"), "hf-in", "d/train.parquet")
    local = _rows(str(tmp_path / "job" / "train.parquet"), samples=SamplesSpec(id="uid"))
    remote = _rows("s3://hf-in/d/train.parquet", samples=SamplesSpec(id="uid"))
    assert [(r.id, r.image_bytes, r.caption) for r in remote if isinstance(r, ManifestRow)] == [
        (r.id, r.image_bytes, r.caption) for r in local if isinstance(r, ManifestRow)
    ]
    assert len(local) == len(remote) == 7 and remote[0].image == "s3://hf-in/d/train.parquet#u0"  # type: ignore[union-attr]


def test_an_image_above_max_bytes_fails_its_row_naming_the_cap(tmp_path: Path) -> None:
    """A sample's member is refused by its tar header's size, before a byte of it is read; a
    Parquet cell by its length. Either way only that row fails."""
    _write_shards(tmp_path / "wds")
    rows = _rows(str(tmp_path / "wds" / "00000.tar"), base=str(tmp_path / "wds"), max_bytes=100)
    assert all(isinstance(r, RowError) and "above inputs.max_bytes (0.0 MiB)" in r.reason for r in rows)
    assert [r.row_id for r in rows] == [f"00000/{n:09d}" for n in range(PER_SHARD)]  # type: ignore[union-attr]
    small, large = b"x" * 10, make_image(tmp_path / "big.png").read_bytes()
    pq.write_table(pa.table({"id": ["s", "l"], "image": [small, large]}), tmp_path / "m.parquet")
    read = _rows(str(tmp_path / "m.parquet"), max_bytes=100)
    assert isinstance(read[0], ManifestRow) and read[0].image_bytes == small
    assert isinstance(read[1], RowError) and read[1].field == "image" and "max_bytes" in read[1].reason


def test_a_shard_of_more_samples_than_its_row_numbers_hold_fails_the_rest_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard i's rows are numbered from i x SHARD_ROWS (1,000,000; lowered here to 5 of the 8)."""
    monkeypatch.setattr(samples, "SHARD_ROWS", 5)
    _write_shards(tmp_path)
    rows = _rows(str(tmp_path / "00000.tar"), base=str(tmp_path))
    assert [isinstance(r, ManifestRow) for r in rows] == [True] * 5 + [False]
    assert isinstance(rows[-1], RowError) and "holds over 5 samples; split it" in rows[-1].reason

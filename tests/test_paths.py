"""Paths and URIs: relative to the spec wherever the process runs, absolute when shipped."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml

from svd_batch.driver import load_spec
from svd_batch.manifest import read_rows
from svd_batch.storage import local_path, open_storage, read_uri
from svd_batch.submit import package
from tests.helpers import write_job


def test_file_relative_means_relative_to_the_spec_and_not_the_cwd(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_job(tmp_path / "job", [], tiny_model, output="file://out/demo", metadata="file://meta")
    monkeypatch.chdir(tmp_path)  # anywhere but the spec's folder
    loaded = load_spec(spec)
    assert loaded.output == str(tmp_path / "job" / "out" / "demo")
    assert loaded.metadata == str(tmp_path / "job" / "meta")


def test_submit_ships_every_path_absolute(tmp_path: Path, tiny_model: Path) -> None:
    spec = write_job(
        tmp_path / "job",
        [{"id": "a", "image": "img/a.png"}],
        tiny_model,
        output="out",
        manifest_base="../images",
        inputs={"allow": ["../images"]},
    )
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    package(spec, shipped)
    document = yaml.safe_load((shipped / "job.yaml").read_text())
    assert document["manifest"] == "manifest.jsonl" and (shipped / "manifest.jsonl").is_file()
    assert document["manifest_base"] == str(tmp_path / "images")
    assert document["output"] == str(tmp_path / "job" / "out")
    assert document["inputs"]["allow"] == [str(tmp_path / "images")]
    assert document["model"]["path"] == str(tiny_model)
    # The shipped spec, read where Ray unpacks it, names the same places.
    assert load_spec(shipped / "job.yaml").manifest_base == str(tmp_path / "images")


def test_percent_encoded_file_uris_name_their_files(tmp_path: Path) -> None:
    folder = tmp_path / "a dir é"
    uri = open_storage(str(folder)).put_bytes(b"x", "v #1?.mp4")
    assert "%20" in uri and local_path(uri) == folder / "v #1?.mp4" and read_uri(uri) == b"x"


def test_s3_keys_keep_hash_and_question_marks(s3_server: str) -> None:
    boto3.client("s3").create_bucket(Bucket="odd-keys")
    storage = open_storage("s3://odd-keys/run #2?x")
    uri = storage.put_bytes(b"video", "clip#1?.mp4")
    assert uri == "s3://odd-keys/run #2?x/clip#1?.mp4" and read_uri(uri) == b"video"
    assert storage.list() == ["clip#1?.mp4"]
    row = json.dumps({"id": "a", "image": "img/a.png"}) + "\n"
    boto3.client("s3").put_object(Bucket="odd-keys", Key="m#1?.jsonl", Body=row.encode())
    assert [r.id for _, r in read_rows("s3://odd-keys/m#1?.jsonl")] == ["a"]

"""Manifests as datasets come: WebDataset tar shards, and Parquet image columns.

img2dataset and its kin write WebDataset shards (`00000.tar` holding `000000001.jpg`,
`000000001.txt`, `000000001.json`), and Hugging Face datasets keep images inside Parquet as
bytes or `{bytes, path}`. Each sample or row becomes a manifest row whose image travels as
bytes with its work item: nothing is unpacked to storage.

A WebDataset manifest names its shards by brace expansion (`s3://b/laion/{00000..09999}.tar`),
a glob, or a folder. The survey only lists them: each shard is a piece, read by a plan task as
a stream (ranged GETs on S3), so the first video does not wait for the dataset to be read.
A sample's id is its shard's name under the manifest's folder and its key (`00042/000420017`),
unique without reading every shard first; its image is `<shard URI>#<member>` and its rows
are numbered shard x SHARD_ROWS + sample, so both name the shard and the sample.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from braceexpand import braceexpand

from svd_batch.errors import first_line
from svd_batch.inputs import mib, too_large
from svd_batch.plan import RowError
from svd_batch.schema import InputsSpec, JobSpec, SamplesSpec
from svd_batch.storage import RangedReader, StorageError, local_path, open_storage

SHARD_ROWS = 1_000_000  # row numbers of shard i are i * SHARD_ROWS + 1, + 2, ...
MAX_TEXT_BYTES = 64 * 1024  # a caption or a row's json: what a manifest line may hold
STREAM_BUFFER = 8 << 20  # bytes of a shard on S3 one ranged GET reads
_SPECIAL = re.compile(r"[{*?\[]")
# WebDataset's rule: a member's key is its path up to the first dot of its file name.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def is_webdataset(uri: str) -> bool:
    """Tar shards: a .tar name, a pattern of them, or a folder (local, or s3:// ending in /)."""
    if uri.endswith(".tar") or uri.endswith("/"):
        return True
    if "://" in uri and not uri.startswith("file://"):
        return False
    return local_path(uri).is_dir()


def shard_base(manifest: str) -> str:
    """The folder a WebDataset manifest names its shards under: a folder itself, or the part
    of a pattern before its first brace or wildcard, up to its last slash."""
    if not _SPECIAL.search(manifest) and not manifest.endswith(".tar"):
        return manifest.rstrip("/")
    literal = _SPECIAL.split(manifest, maxsplit=1)[0]
    return literal.rsplit("/", 1)[0] if "/" in literal else "."


def shards(manifest: str) -> list[str]:
    """The shard URIs a WebDataset manifest names, in order (braces as written, globs sorted)."""
    found: list[str] = []
    for pattern in braceexpand(manifest):
        if pattern.endswith("/") or (not _SPECIAL.search(pattern) and not pattern.endswith(".tar")):
            found += _listed(pattern.rstrip("/") + "/", "*.tar")
        elif _SPECIAL.search(pattern):
            folder, _, name = pattern.rpartition("/")
            found += _listed(folder + "/", name) if pattern.startswith("s3://") else sorted(glob.glob(pattern))
        else:
            found.append(pattern)
    return found


def _listed(folder: str, name: str) -> list[str]:
    """Files directly in `folder` whose name matches `name` (an fnmatch pattern)."""
    if folder.startswith("s3://"):
        storage = open_storage(folder)
        keys = [k for k in storage.list() if "/" not in k]
        return [f"{folder}{k}" for k in keys if fnmatch.fnmatchcase(k, name)]
    return sorted(str(p) for p in local_path(folder).glob(name) if p.is_file())


@dataclass(frozen=True)
class Reading:
    """What reading a dataset manifest's rows needs from its job spec."""

    samples: SamplesSpec = field(default_factory=SamplesSpec)
    max_bytes: int = InputsSpec().max_bytes
    base: str = ""  # shard_base of the manifest

    @classmethod
    def for_spec(cls, spec: JobSpec) -> Reading:
        return cls(spec.samples, spec.inputs.max_bytes, shard_base(spec.manifest))

    def shard_name(self, uri: str) -> str:
        inside = uri[len(self.base) + 1 :] if self.base and uri.startswith(self.base + "/") else uri.rsplit("/", 1)[-1]
        return inside.removesuffix(".tar")


@contextmanager
def _stream(uri: str) -> Iterator[io.BufferedIOBase]:
    if uri.startswith("s3://"):
        with io.BufferedReader(RangedReader(uri), STREAM_BUFFER) as stream:
            yield stream
        return
    with local_path(uri).open("rb") as stream:
        yield stream


def shard_rows(uri: str, first: int, reading: Reading) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Each sample of one shard as a raw manifest row (with its image bytes), or its RowError;
    a shard that ends early fails the sample it was in and says the rest were not read."""
    name, number, seen = reading.shard_name(uri), first, set()
    wanted = {*reading.samples.image, reading.samples.caption, reading.samples.row} - {None}
    key: str | None = None
    members: dict[str, bytes | int] = {}  # extension: bytes, or the size of an image too large to read
    names: dict[str, str] = {}  # extension: the member's name as written
    try:
        with _stream(uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = _MEMBER.match(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[1] != key:
                    if key is not None:
                        yield number, _row(uri, name, key, members, names, reading, number, seen)
                        number += 1
                    if number - first >= SHARD_ROWS:  # its row numbers would run into the next shard's
                        reason = f"shard {uri} holds over {SHARD_ROWS:,} samples; split it"
                        yield number, RowError(number, f"{name}/{parts[1]}", "(shard)", reason)
                        return
                    key, members, names = parts[1], {}, {}
                extension = parts[2].lower()
                if extension not in wanted:
                    continue
                limit = reading.max_bytes if extension in reading.samples.image else MAX_TEXT_BYTES
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file
                members[extension] = member.size if member.size > limit else handle.read()
                names[extension] = member.name
            if key is not None:
                yield number, _row(uri, name, key, members, names, reading, number, seen)
    except (tarfile.TarError, EOFError, OSError, StorageError) as exc:
        if isinstance(exc, StorageError) and exc.retryable:
            raise  # S3 down or throttling: the plan task fails, as for any manifest piece
        where = f"in sample {key}" if key is not None else "before its first sample"
        reason = (
            f"shard {uri} could not be read to its end ({first_line(exc)}) {where}; "
            "its samples from there on were not read: write the shard again or fix the manifest"
        )
        yield number, RowError(number, f"{name}/{key}" if key is not None else name, "(shard)", reason)


def _row(
    uri: str,
    name: str,
    key: str,
    members: dict[str, bytes | int],
    names: dict[str, str],
    reading: Reading,
    number: int,
    seen: set[str],
) -> dict[str, Any] | RowError:
    samples, row_id = reading.samples, f"{name}/{key}"

    def error(field: str, reason: str) -> RowError:
        return RowError(number, row_id, field, f"{reason} (shard {uri}, sample {key})")

    if key in seen:
        return error("id", "a second sample with this key in its shard; every sample needs its own key")
    seen.add(key)
    raw: dict[str, Any] = {}
    if samples.row is not None and samples.row in members:
        try:
            raw = json.loads(_text(members[samples.row]))
        except (ValueError, TypeError) as exc:
            return error(samples.row, f"member .{samples.row} is not a JSON object of at most 64 KiB ({exc})")
        if not isinstance(raw, dict):
            return error(samples.row, f"member .{samples.row} must be a JSON object, as a manifest line is")
        raw = {field: value for field, value in raw.items() if field not in samples.ignore}
        if taken := sorted({"id", "image"} & raw.keys()):
            reason = f"is set by the sample itself (its key, its image member); drop it from .{samples.row}"
            return error(taken[0], reason)
    if samples.caption is not None and samples.caption in members and "caption" not in raw:
        try:
            raw["caption"] = _text(members[samples.caption]).strip()
        except (ValueError, TypeError) as exc:
            return error("caption", f"member .{samples.caption} is not UTF-8 text of at most 64 KiB ({exc})")
    extension = next((e for e in samples.image if e in members), None)
    if extension is None:
        held = ", ".join(sorted(members)) or "no member it reads"
        return error("image", f"no image member ({', '.join(samples.image)}; it has {held}); name it in samples.image")
    data = members[extension]
    if isinstance(data, int):  # only a member above the cap is held as its size
        refused = too_large(names[extension], data, reading.max_bytes)
        assert refused is not None
        return error("image", refused)
    return {**raw, "id": row_id, "image": f"{uri}#{names[extension]}", "image_bytes": data}


def _text(value: bytes | int) -> str:
    if isinstance(value, int):
        raise ValueError(mib(value))
    return value.decode()


def image_cell(record: dict[str, Any], uri: str, number: int, reading: Reading) -> dict[str, Any] | RowError:
    """A Parquet row whose image is bytes or a {bytes, path} struct (the Hugging Face layout),
    as a row that renders from those bytes; its id from the column samples.id names."""
    if reading.samples.id != "id" and reading.samples.id in record:
        record["id"] = record.pop(reading.samples.id)
    image = record.get("image")
    if isinstance(image, dict):  # {bytes, path}: a null bytes is a file the path names
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
        if image is None:
            del record["image"]
        else:
            record["image"] = image
    if isinstance(image, bytes):
        row_id = record.get("id")
        if refused := too_large("its image cell", len(image), reading.max_bytes):
            return RowError(number, str(row_id) if row_id is not None else None, "image", refused)
        record["image"] = f"{uri}#{row_id if row_id is not None else f'row-{number}'}"
        record["image_bytes"] = image
    return record

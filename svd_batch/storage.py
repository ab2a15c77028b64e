"""`file://` and `s3://` storage: atomic puts, multipart uploads, retries with backoff.

S3 endpoints and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), so MinIO, Ceph and other S3
servers work unchanged. Keys are always relative to the storage root and can never climb
out of it.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from svd_batch.errors import first_line

MULTIPART_THRESHOLD = 16 * 1024 * 1024


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are created 0600; a finished output gets the mode any other file would
# (0644 under the usual umask 022), so the people and jobs that read outputs can.
FILE_MODE = 0o666 & ~_read_umask()


class StorageError(RuntimeError):
    """A storage operation failed after its retries; the message names the URI.

    `retryable`: whether the same call could succeed later (a server down, throttling), as
    opposed to an answer that will not change (no such object, access denied)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _http_status(exc: BaseException | None) -> int:
    """The HTTP status S3 answered, also through boto3's transfer manager, which wraps the
    ClientError that carries it (S3UploadFailedError); 0 if there was no answer."""
    while exc is not None:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return int(status)
        exc = exc.__cause__ or exc.__context__
    return 0


def _s3_error(message: str, exc: BaseException) -> StorageError:
    status = _http_status(exc)
    # A 4xx answer (other than throttling) is final; no answer at all, or a 5xx, may pass.
    return StorageError(f"{message}: {first_line(exc)}", retryable=not 400 <= status < 500 or status == 429)


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`. Not urlparse: `#` and `?` are part of an S3 key."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _safe_key(key: str) -> str:
    path = PurePosixPath(key)
    if not key or "\x00" in key or path.is_absolute() or ".." in path.parts:
        raise StorageError(f"refusing key {key!r}: keys must stay inside the output prefix", retryable=False)
    return str(path)


@functools.cache
def _s3_client():  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    # botocore's "standard" mode retries throttling (SlowDown), 5xx and refused connections with
    # exponential backoff and jitter (up to 20 s a wait); "adaptive" would add client-side rate
    # limiting on top. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still override, as in every AWS tool.
    retries = {
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
    }
    config = Config(retries=retries, connect_timeout=5, read_timeout=60)
    return boto3.session.Session().client("s3", config=config)


def _transfer_config():  # type: ignore[no-untyped-def]
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


@dataclass(frozen=True)
class LocalStorage:
    root: Path

    def uri(self, key: str) -> str:
        return (self.root / _safe_key(key)).as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def _atomic(self, key: str, data: bytes, exclusive: bool = False) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename (or, exclusive, link(2), which fails if the
        # target exists): readers see the whole file or nothing.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            if not exclusive:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, local: Path, key: str) -> str:
        self._atomic(key, local.read_bytes())
        return self.uri(key)

    def put_bytes(self, data: bytes, key: str) -> str:
        self._atomic(key, data)
        return self.uri(key)

    def create(self, data: bytes, key: str) -> bool:
        """Write `key` only if it does not exist yet (False if it does), whole or not at all."""
        return self._atomic(key, data, exclusive=True)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root.as_uri()} is not writable; fix its permissions or choose another output")


@dataclass(frozen=True)
class S3Storage:
    bucket: str
    prefix: str

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{_safe_key(key)}" if self.prefix else _safe_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, local: Path, key: str) -> str:
        try:
            # upload_file switches to multipart above the threshold; S3 shows an object only
            # once it is complete, so no half-written video is ever visible under its key.
            _s3_client().upload_file(str(local), self.bucket, self._key(key), Config=_transfer_config())
        except Exception as exc:
            raise _s3_error(f"upload to {self.uri(key)} failed", exc) from exc
        return self.uri(key)

    def put_bytes(self, data: bytes, key: str) -> str:
        try:
            _s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise _s3_error(f"upload to {self.uri(key)} failed", exc) from exc
        return self.uri(key)

    def create(self, data: bytes, key: str) -> bool:
        """Write `key` only if it does not exist yet (False if it does): S3's conditional PUT."""
        try:
            _s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
                return False
            raise _s3_error(f"upload to {self.uri(key)} failed", exc) from exc
        return True

    def get_bytes(self, key: str) -> bytes:
        return read_uri(self.uri(key))

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise _s3_error(f"listing s3://{self.bucket}/{full} failed", exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            _s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise _s3_error(f"deleting {self.uri(key)} failed", exc) from exc

    def check(self) -> None:
        try:
            _s3_client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(
                f"s3://{self.bucket} is not reachable: {first_line(exc)}; check AWS_ENDPOINT_URL, credentials "
                "and that the bucket exists"
            ) from exc


Storage = LocalStorage | S3Storage


def open_storage(uri: str, base: Path | None = None) -> Storage:
    """`s3://bucket/prefix`, `file:///abs/dir`, or a plain path (relative to `base`)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX", retryable=False)
        return S3Storage(bucket, prefix.strip("/"))
    return LocalStorage(local_path(uri, base))


def local_path(uri: str, base: Path | None = None) -> Path:
    """A plain path, or a `file://` URI: `file:///abs` as written by Path.as_uri (percent-encoded),
    `file://rel/dir` relative to `base` like a bare relative path."""
    if uri.startswith("file://"):
        path = Path(unquote(uri.removeprefix("file://")))
    elif "://" not in uri:
        path = Path(uri)
    else:
        scheme = urlparse(uri).scheme
        raise StorageError(f"{uri!r}: unsupported scheme {scheme!r}; use a path, file:// or s3://", retryable=False)
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.expanduser().resolve()


def s3_body(uri: str, start: int = 0, end: int | None = None):  # type: ignore[no-untyped-def]
    """The streaming body of an `s3://` object, or of its bytes [start, end); errors name the
    URI and why."""
    bucket, key = split_s3(uri)
    ranged = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
    try:
        return _s3_client().get_object(Bucket=bucket, Key=key, **ranged)["Body"]
    except Exception as exc:
        raise _s3_error(f"cannot read {uri}", exc) from exc


def s3_size(uri: str) -> int:
    """An object's size in bytes, from HEAD: nothing of it is read."""
    bucket, key = split_s3(uri)
    try:
        return _s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:
        raise _s3_error(f"cannot read {uri}", exc) from exc


def read_uri(uri: str, base: Path | None = None) -> bytes:
    """Bytes of a local path or `s3://` object; errors say which and why."""
    if uri.startswith("s3://"):
        return s3_body(uri).read()
    path = local_path(uri, base)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise read_error(path, exc) from None


def read_error(path: Path, exc: OSError) -> StorageError:
    """Why a local file could not be read, and the fix."""
    if isinstance(exc, FileNotFoundError):
        reason = "does not exist; fix the path (relative paths resolve against the manifest)"
    elif isinstance(exc, PermissionError):
        reason = "is not readable (permission denied); fix its permissions"
    elif isinstance(exc, IsADirectoryError):
        reason = "is a directory, not a file"
    else:  # an I/O error of the filesystem (a network mount gone away) may pass
        return StorageError(f"{path} cannot be read ({first_line(exc)})")
    return StorageError(f"{path} {reason}", retryable=False)


class RangedReader(io.RawIOBase):
    """An S3 object as a seekable file, each read one ranged GET: a Parquet piece reads the
    footer and its own row groups' column chunks, never the whole object, and a tar shard is
    streamed a buffer at a time (wrap it in io.BufferedReader)."""

    def __init__(self, uri: str) -> None:
        self.uri, self.size, self.at = uri, s3_size(uri), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.size}[whence] + offset
        return self.at

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.size - self.at)
        if wanted <= 0:
            return 0
        data = s3_body(self.uri, self.at, self.at + wanted).read()
        buffer[: len(data)] = data
        self.at += len(data)
        return len(data)

"""What a row may read, and how much: a manifest is untrusted input on a shared cluster.

Rows read only under `inputs.allow` (by default the manifest's own folder tree or bucket
prefix), only regular files, and at most `inputs.max_bytes` of each, checked by `stat` or
S3 `HEAD` before a byte is read. The planner checks each reference as written (no file is
touched, so a refusal says nothing about whether the file exists); the worker checks the
real path again as it reads, so a symlink cannot lead out.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass

from svd_batch.schema import JobSpec
from svd_batch.storage import StorageError, local_path, read_error, s3_body, s3_size


class InputError(StorageError):
    """A row's input is refused; the message names it and the fix. Final: it will not pass."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def manifest_dir(manifest_uri: str) -> str:
    """The folder that relative references in a manifest are relative to."""
    return posixpath.dirname(manifest_uri.rstrip("/"))


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def too_large(name: str, size: int, max_bytes: int) -> str | None:
    """The refusal of an input of `size` bytes above the cap, with the fix; None if it fits.
    One wording for a file, an object, a shard's member and a Parquet cell."""
    if size <= max_bytes:
        return None
    return (
        f"{name} is {mib(size)}, above inputs.max_bytes ({mib(max_bytes)}); shrink the file or raise inputs.max_bytes"
    )


def _under(uri: str, root: str) -> bool:
    root = root.rstrip("/")
    return uri == root or uri.startswith(root + "/")


@dataclass(frozen=True)
class InputPolicy:
    allow: tuple[str, ...]  # absolute folders and s3://bucket/prefix roots
    max_bytes: int

    @classmethod
    def for_spec(cls, spec: JobSpec) -> InputPolicy:
        default = spec.manifest_base or manifest_dir(spec.manifest)
        return cls(tuple(spec.inputs.allow or [default]), spec.inputs.max_bytes)

    @staticmethod
    def _normal(uri: str) -> str:
        if uri.startswith("s3://"):
            return "s3://" + posixpath.normpath(uri.removeprefix("s3://"))
        return posixpath.normpath(uri.removeprefix("file://"))

    def check(self, uri: str) -> None:
        """Refuse a reference outside the allow-list, as written; nothing is read or stat'ed."""
        if not any(_under(self._normal(uri), root) for root in self.allow):
            self._refuse(uri)

    def covers(self, prefix: str) -> bool:
        """Whether `check` passes prefix + name for every plain name (no dot segments, no
        slashes at either end): so planning can check a folder once, not every row in it."""
        probe = prefix + "x"
        return self._normal(probe) == probe and any(prefix.startswith(root.rstrip("/") + "/") for root in self.allow)

    def _refuse(self, uri: str) -> None:
        raise InputError(
            f"{uri} is outside inputs.allow ({', '.join(self.allow)}); to let rows read there, add "
            f"'{posixpath.dirname(self._normal(uri))}' to inputs.allow in the job spec"
        )

    def read(self, uri: str) -> bytes:
        """The bytes of an allowed, regular, not too large input."""
        self.check(uri)
        if uri.startswith("s3://"):
            self._check_size(uri, s3_size(uri))
            return s3_body(uri).read()
        path = local_path(uri)  # resolved: symlinks followed to where they really lead
        if not any(_under(str(path), str(local_path(root))) for root in self.allow if "://" not in root):
            self._refuse(uri)
        try:
            # Non-blocking, so a FIFO opens at once instead of waiting for a writer; what was
            # opened is then checked, so nothing can be swapped in between check and read.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise read_error(path, exc) from None
        info = os.fstat(fd)
        try:
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
                raise InputError(f"{path} is {kind}, not a regular file; point the row at an image file")
            self._check_size(str(path), info.st_size)
        except InputError:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as handle:
            return handle.read(self.max_bytes + 1)[: self.max_bytes]

    def _check_size(self, name: str, size: int) -> None:
        if refused := too_large(name, size, self.max_bytes):
            raise InputError(refused)

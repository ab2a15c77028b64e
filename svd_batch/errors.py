"""How an exception becomes the one line a user reads; the exit codes a run ends with, and the
error of a job that cannot start (driver.exit_code maps a run's end to the codes)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED_ROWS, EXIT_CANNOT_START, EXIT_STOPPED = 0, 1, 2, 3


class JobError(RuntimeError):
    """The job cannot start; the message is the one line the user sees (exit 2)."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of the exception's message (libraries append pages of context), or its
    type's name when it has no message; `with_type` puts the type in front."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if with_type:
        return f"{type(exc).__name__}: {text}".rstrip(": ")
    return text or type(exc).__name__


def is_retryable(exc: BaseException) -> bool:
    """Whether the same work could succeed on a later run: the failure was the moment's (a
    storage outage, memory pressure), not the row's. Errors that know say so (`retryable`)."""
    known = getattr(exc, "retryable", None)
    if known is not None:
        return bool(known)
    return isinstance(exc, MemoryError | TimeoutError | ConnectionError) or "out of memory" in str(exc).lower()

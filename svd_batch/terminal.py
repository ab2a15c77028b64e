"""What reaches the terminal of `svd-batch run`: its own lines, not two known notes of Ray's.

- Ray 2.60's C++ core, in the driver process, writes one error-level line to file descriptor 2
  for every Ray Data actor pool: "Actor ... has constructor arguments in the object store and
  max_restarts > 0" (ray issue 57733: Ray Data passes its own constructor arguments that way;
  svd-batch's workers take none, and the line is harmless). It cannot be configured off
  without also silencing Ray's log files. So the driver's native stderr (fd 2) goes through a
  pipe that drops exactly such lines and passes everything else on; Python's own stderr
  (progress, errors, tracebacks) is moved to a copy of the original descriptor first.
- The raylet tells the driver, on its stdout, "N PYTHON worker processes have been started
  ... 4x the maximum expected startup concurrency" whenever Ray starts more than 4 worker
  processes per core. A run starts about that many by design (each worker and the run's
  control actor ask for a fraction of a CPU, so Ray Data's own tasks always find one), and a
  loaded machine registers them late, so the note says nothing a user can act on. Python's
  stdout goes through a line filter that drops it.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading

KNOWN_NATIVE_NOTES = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments")
KNOWN_RAYLET_NOTES = re.compile(r"PYTHON worker processes have been started on node: .* maximum expected startup")


class _DropLines(io.TextIOBase):
    """A text stream that holds each line until it ends, and drops the lines `known` matches."""

    def __init__(self, stream: io.TextIOBase, known: re.Pattern[str]) -> None:
        self._stream, self._known, self._line = stream, known, ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if not self._known.search(line):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line and not self._known.search(self._line):  # an unended line: out it goes
            self._stream.write(self._line)
            self._line = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def drop_known_native_notes() -> None:
    """From now on, native writes to fd 2 and Python's stdout lose the known notes."""
    terminal = os.dup(2)
    sys.stderr.flush()
    # Python keeps writing to the terminal itself, unfiltered (and a TTY stays a TTY for Rich).
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")  # noqa: SIM115
    sys.stdout = _DropLines(sys.stdout, KNOWN_RAYLET_NOTES)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as native:
            for line in native:
                if not KNOWN_NATIVE_NOTES.search(line):
                    os.write(terminal, line)

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()

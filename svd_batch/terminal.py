"""What reaches the terminal of `svd-batch run`: its own lines, not Ray's C++ notes.

Ray 2.60's C++ core, in the driver process, writes one error-level line to file descriptor 2
for every Ray Data actor pool: "Actor ... has constructor arguments in the object store and
max_restarts > 0" (ray issue 57733: Ray Data passes its own constructor arguments that way;
svd-batch's workers take none, and the line is harmless). It cannot be configured off without
also silencing Ray's log files. So the driver's native stderr (fd 2) goes through a pipe that
drops exactly such known lines and passes everything else on; Python's own stderr (progress,
errors, tracebacks) is moved to a copy of the original descriptor first and never touches it.
"""

from __future__ import annotations

import os
import re
import sys
import threading

KNOWN_NATIVE_NOTES = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments")


def drop_known_native_notes() -> None:
    """From now on, native writes to fd 2 lose the known notes; everything else passes."""
    terminal = os.dup(2)
    sys.stderr.flush()
    # Python keeps writing to the terminal itself, unfiltered (and a TTY stays a TTY for Rich).
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")  # noqa: SIM115
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as native:
            for line in native:
                if not KNOWN_NATIVE_NOTES.search(line):
                    os.write(terminal, line)

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()

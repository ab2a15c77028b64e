"""Tell someone how a run ended: its summary JSON, POSTed to the spec's `notify.webhook`.

A webhook URL is a credential (Slack's and most chat tools' carry their secret in the path, others
in the query), so it is never written anywhere: what a log says names only its scheme and host.
A notice that cannot be delivered is a warning; it never changes how the run ended.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a receiver that is restarting, or answers 429 / 5xx, gets two more chances
TIMEOUT_S = 10.0


def redact(url: str) -> str:
    """What of a webhook URL may be shown: scheme and host, never user, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/…"


def post(url: str, summary: dict[str, Any], backoff_s: float = 1.0) -> bool:
    """POST the summary as JSON; True once a receiver took it (2xx)."""
    body = json.dumps(summary, default=str).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "svd-batch"}
    )
    problem = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S):
                return True
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
            if exc.code != 429 and exc.code < 500:  # the receiver refuses this notice: asking again won't help
                break
        except (urllib.error.URLError, OSError) as exc:
            problem = type(exc).__name__ + (f" ({exc.reason})" if isinstance(exc, urllib.error.URLError) else "")
    log.warning("notify: %s did not take the run's summary: %s", redact(url), problem)
    return False

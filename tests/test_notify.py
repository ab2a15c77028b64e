"""The run's summary reaches a real HTTP receiver when it ends; its URL, a secret, never a log."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from svd_batch.driver import Job, JobError, load_spec
from svd_batch.notify import redact
from svd_batch.schema import NotifySpec
from tests.helpers import SIMULATE, rows_and_images, run_records, write_job

SECRET = "T0KEN-s3cr3t"


class Receiver(ThreadingHTTPServer):
    """A webhook endpoint on 127.0.0.1 that keeps what it is sent and answers `status`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, str, dict[str, Any]]] = []
        self.status = 200

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads what was received


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_summary_is_posted_when_a_run_finishes_and_when_it_stops(
    tmp_path: Path, tiny_model: Path, ray_cluster: object, receiver: Receiver
) -> None:
    rows = [*rows_and_images(tmp_path, 3), {"id": "broken", "image": "img/text.png"}]
    (tmp_path / "img" / "text.png").write_text("not an image")
    hook = receiver.url(f"/hooks/{SECRET}?token={SECRET}")
    spec = write_job(tmp_path, rows, tiny_model, notify={"webhook": hook}, simulate=SIMULATE)
    job = Job(load_spec(spec))
    assert job.run() == Counter(ok=3, failed=1)
    ((path, kind, summary),) = receiver.received
    assert path == f"/hooks/{SECRET}?token={SECRET}" and kind == "application/json"
    assert summary["state"] == "finished" and summary["exit_code"] == 1 and summary["run_id"] == job.run_id
    assert summary["counts"] == {"ok": 3, "failed": 1} and summary["total"] == 4
    assert summary["failures"] == [{"stage": "image", "type": "ImageError", "retryable": False, "rows": 1}]
    assert summary["output"] == load_spec(spec).output and summary["versions"]["ray"]
    assert SECRET not in json.dumps(summary)  # the notice does not carry its own address

    stopped = Job(load_spec(spec), max_duration=0, retry_failed=True)
    stopped.run()
    summary = receiver.received[-1][2]
    assert (
        summary["state"] == "stopped" and summary["exit_code"] == 3 and summary["counts"] == {"skipped": 3, "left": 1}
    )
    assert summary["stopped"].startswith("stopped at the 0s limit")
    assert [r.state for r in run_records(spec)] == ["finished", "stopped"]


def test_a_run_that_cannot_start_still_tells_and_a_refusing_receiver_costs_nothing_and_never_leaks_the_url(
    tmp_path: Path, tiny_model: Path, ray_cluster: object, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    hook = receiver.url(f"/hooks/{SECRET}")
    spec = write_job(tmp_path, rows_and_images(tmp_path, 1), tmp_path / "no-model", notify={"webhook": hook})
    with pytest.raises(JobError, match=r"model\.path"):
        Job(load_spec(spec)).run()
    ((_, _, summary),) = receiver.received
    assert summary["state"] == "failed" and summary["exit_code"] == 2 and "model.path" in summary["error"]

    receiver.status = 500  # a receiver that is down: asked three times, then a warning; the run is fine
    spec = write_job(tmp_path, rows_and_images(tmp_path, 1), tiny_model, notify={"webhook": hook}, simulate=SIMULATE)
    with caplog.at_level(logging.WARNING, logger="svd_batch.notify"):
        assert Job(load_spec(spec)).run() == Counter(ok=1)
    assert len(receiver.received) == 4  # the notice of the first run, then three attempts at this one's
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "svd_batch.notify"]
    port = receiver.server_address[1]
    assert warning == f"notify: http://127.0.0.1:{port}/… did not take the run's summary: HTTP 500"
    assert SECRET not in caplog.text


def test_webhooks_are_http_urls_and_only_their_host_is_ever_shown() -> None:
    with pytest.raises(ValidationError, match="is not an http\\(s\\) URL"):
        NotifySpec(webhook="hooks.example.com/x")
    assert redact(f"https://user:{SECRET}@hooks.example.com:8443/services/{SECRET}?k={SECRET}") == (
        "https://hooks.example.com:8443/…"
    )

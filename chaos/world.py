"""The real parts a chaos run breaks: a moto S3 server behind the fault proxy, a Ray cluster of
a head and two worker nodes on this machine (ray.cluster_utils), and a job on simulated
devices with shards and gates on, run by `svd-batch run` processes the faults may kill."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import boto3
import numpy as np
import psutil
import yaml
from PIL import Image

from chaos.proxy import FaultyS3, free_port
from svd_batch.driver import load_spec
from svd_batch.engine import simulated
from svd_batch.ledger import latest
from svd_batch.metadata import read_table
from svd_batch.schema import JobSpec
from svd_batch.storage import open_storage

BUCKET = "chaos"
PARAMS = {"height": 32, "width": 32, "num_frames": 4, "num_inference_steps": 2, "decode_chunk_size": 2}
SECONDS_PER_VIDEO = 0.8  # of a simulated device: a job of minutes, for faults to land mid-job
DEVICES_PER_NODE = 2
WORKERS = 4  # of 6 devices: a lost node leaves enough for the job to go on
GATED_EVERY = 9  # every 9th row has a gate no clip meets: it ends rejected after its tries
T = TypeVar("T")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "us-east-1"}


def _answers(endpoint: str) -> bool:
    try:
        boto3.client("s3", endpoint_url=endpoint).list_buckets()
    except Exception:  # not up yet, whatever the way it says so
        return False
    return True


def wait_until(probe: Callable[[], T], what: str, timeout: float = 300, every: float = 0.2) -> T:
    """Poll until `probe` returns something truthy; fail naming the event if it never comes.
    The chaos run and the tests wait for events, never for a fixed time: the machines that run
    them differ in speed by 2x and more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


@dataclass
class World:
    folder: Path
    rows: int
    upstream: str = ""
    proxy: FaultyS3 | None = None
    moto: subprocess.Popen[bytes] | None = None
    cluster: object = None
    driver: subprocess.Popen[str] | None = None
    drivers: list[subprocess.Popen[str]] = field(default_factory=list)  # every one started, for its output
    stopped: list[int] = field(default_factory=list)  # pids of workers SIGSTOPped and not yet resumed
    broken: set[str] = field(default_factory=set)  # metadata parts the faults broke: unreadable by design
    timers: list[threading.Timer] = field(default_factory=list)  # faults' ends still to come

    # --- the parts ---------------------------------------------------------------------------

    def start(self) -> None:
        """S3, then the proxy, then the cluster: its raylets, and so its workers, see the proxy
        as their S3 endpoint, as production workers see theirs, through the AWS variables."""
        from ray.cluster_utils import Cluster

        os.environ.update(CREDENTIALS)
        port = free_port()
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.upstream = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(self.upstream), "the S3 server", timeout=120)
        boto3.client("s3", endpoint_url=self.upstream).create_bucket(Bucket=BUCKET)
        self.proxy = FaultyS3(self.upstream)
        self._write_job()
        with self._through_proxy():
            cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 2, "resources": {simulated.RESOURCE: DEVICES_PER_NODE}},
            )
            self.cluster = cluster
            for _ in range(2):
                self.add_node()
            cluster.wait_for_nodes()
        # This process reads storage past the proxy: the checker trusts no hop the faults touch.
        os.environ["AWS_ENDPOINT_URL"] = self.upstream

    def add_node(self) -> None:
        with self._through_proxy():
            self.cluster.add_node(num_cpus=1, resources={simulated.RESOURCE: DEVICES_PER_NODE})  # type: ignore[attr-defined]

    def worker_nodes(self) -> list[object]:
        return list(self.cluster.worker_nodes)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _through_proxy(self) -> Iterator[None]:
        assert self.proxy is not None
        before = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = self.proxy.endpoint
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("AWS_ENDPOINT_URL")
            else:
                os.environ["AWS_ENDPOINT_URL"] = before

    def later(self, seconds: float, end: Callable[[], None]) -> None:
        """End a fault after `seconds`, while the run goes on looking and firing others."""
        timer = threading.Timer(seconds, end)
        self.timers.append(timer)
        timer.start()

    def settled(self) -> bool:
        """Whether every fault has ended (a check of storage while S3 is down would fail)."""
        return not any(timer.is_alive() for timer in self.timers)

    def close(self) -> None:
        for timer in self.timers:
            timer.join()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 18)  # SIGCONT: a stopped process ignores the shutdown's signals
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        if self.cluster is not None:
            self.cluster.shutdown()  # type: ignore[attr-defined]
        if self.proxy is not None:
            self.proxy.stop()
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(timeout=30)

    # --- the job -----------------------------------------------------------------------------

    @property
    def spec_path(self) -> Path:
        return self.folder / "job.yaml"

    @property
    def spec(self) -> JobSpec:
        return load_spec(self.spec_path)

    def _write_job(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "img").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(self.folder / "img" / f"{i}.png")
        rows = [
            {"id": f"r{n:04d}", "image": f"img/{n % 8}.png", "seed": n}
            | ({"quality": {"min_motion": 1e9}} if n % GATED_EVERY == 0 else {})
            for n in range(self.rows)
        ]
        (self.folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "name": "chaos",
            "manifest": "manifest.jsonl",
            "output": f"s3://{BUCKET}/out",
            "model": {"path": str(_tiny_model())},
            "defaults": PARAMS,
            "formats": [],
            "shards": {"size": 8},
            "quality": {"max_tries": 2},
            "workers": {"count": WORKERS, "batch_size": 2, "no_progress_timeout_s": 120},
            "lease_ttl_s": 10,
            "commit_every_s": 1,  # the ledger, and so the faults' moments, move in small steps
            "simulate": SECONDS_PER_VIDEO,
        }
        self.spec_path.write_text(yaml.safe_dump(spec))

    def manifest_ids(self) -> list[str]:
        return [json.loads(line)["id"] for line in (self.folder / "manifest.jsonl").read_text().splitlines()]

    def start_driver(self, capture: bool = False) -> subprocess.Popen[str]:
        """`svd-batch run` as a user starts it, on the cluster, its S3 through the proxy. Its
        output goes to a log file in the job's folder (a pipe nobody reads would block it), or,
        `capture`, to pipes the caller reads."""
        assert self.proxy is not None
        log = open(self.folder / f"driver-{len(self.drivers)}.log", "w")  # noqa: SIM115 (the child's)
        process = subprocess.Popen(
            [sys.executable, "-m", "svd_batch.cli", "run", str(self.spec_path), "--address", self.address],
            stdout=subprocess.PIPE if capture else log,
            stderr=subprocess.PIPE if capture else subprocess.STDOUT,
            text=True,
            env={**os.environ, "AWS_ENDPOINT_URL": self.proxy.endpoint},
        )
        log.close()
        self.drivers.append(process)
        return process

    @property
    def address(self) -> str:
        return str(self.cluster.address)  # type: ignore[attr-defined]

    # --- what is there -----------------------------------------------------------------------

    def workers(self) -> list[psutil.Process]:
        """The job's Ray Data workers, on every node: descendants of this process (its cluster's
        raylets started them), never those of another job or test suite on this machine."""
        found = []
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "SpecRayWorker" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        return found

    def done(self) -> int:
        """Videos with a latest ok or rejected row in the ledger: the job's progress, as storage says."""
        table = latest(read_table(open_storage(self.spec.metadata_uri)))
        return sum(status in ("ok", "rejected") for status in table.column("status").to_pylist())


def _tiny_model() -> Path:
    from svd_batch.engine.checkpoints import ensure_checkpoint

    return ensure_checkpoint()

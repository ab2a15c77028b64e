"""The parts a run is composed of, each alone: the driver's (limits, accounting, status, ledger,
shards' end, preflight) and a worker call's steps (prepare, render on the device, judge,
write). The jobs in the other tests run them together."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from svd_batch.accounting import Accounting
from svd_batch.device import CpuClock
from svd_batch.device_calls import DeviceCalls
from svd_batch.driver import load_spec
from svd_batch.engine import simulated
from svd_batch.errors import JobError
from svd_batch.judging import Judge
from svd_batch.limits import Limits
from svd_batch.metadata import MetadataWriter
from svd_batch.plan import Planner
from svd_batch.preflight import check_memory, worker_needs
from svd_batch.preparing import Prepared
from svd_batch.render import start_control
from svd_batch.run_ledger import RunLedger
from svd_batch.run_shards import ShardCommits
from svd_batch.run_status import RunStatus
from svd_batch.schema import JobSpec, ManifestRow, ResultRow, Status, WorkItem
from svd_batch.storage import open_storage
from svd_batch.worker import RowWorker
from svd_batch.writing import Writing
from tests.helpers import rows_and_images, wait_until, write_job


def _spec(tmp_path: Path, model: Path, rows: int = 3, **spec: object) -> JobSpec:
    return load_spec(write_job(tmp_path, rows_and_images(tmp_path, rows), model, simulate=0.01, **spec))


def _items(spec: JobSpec, rows: int = 3) -> list[WorkItem]:
    planner = Planner(spec, spec.manifest, "run1", simulated.FINGERPRINT)
    return [planner.resolve(ManifestRow(id=f"q{i}", image=f"img/{i}.png"), i + 1)[0].work_item() for i in range(rows)]


def test_a_limit_drains_with_its_reason_and_is_out_of_time_only_when_it_stopped_the_run() -> None:
    reasons: list[str] = []
    due = Limits(None, 0, lambda reason: not reasons.append(reason))  # the first drain: True
    due.arm()  # already due: drains at once, before any row is taken
    assert reasons == ["stopped at the 0s limit"] and due.out_of_time and due.limit and due.limit[1] == "the 0s limit"
    fired = threading.Event()
    # The run had stopped already (a signal, a lost lease): its drain says this reason came second.
    late = Limits(None, 1, lambda reason: fired.set() or False)
    late.arm()
    wait_until(fired.is_set, "the 1 s limit's timer")
    assert not late.out_of_time and (late.seconds_left() or 0) <= 1
    late.cancel()


def test_accounting_counts_commits_and_writes_what_no_worker_returned_failed_and_retryable(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    import ray

    spec = _spec(tmp_path, tiny_model)
    items = _items(spec)
    control = start_control("parts-accounting", draining=False)
    ray.get(control.planned.remote({"videos": 3, "handed": 3}))
    tally = Accounting(MetadataWriter(open_storage(str(tmp_path / "meta")), "run1"))
    tally.commit([ResultRow.for_item(items[0], Status.ok)])
    tally.close(control, stopped=False, stalled=None, plan_again=lambda: [items[1:]])
    assert tally.counts == Counter(ok=1, failed=2) and tally.total == 3
    assert tally.failures == Counter({("worker", "Lost", True): 2})
    tally.writer.close()
    rows = pq.read_table(tmp_path / "meta").to_pylist()
    lost = [r for r in rows if r["status"] == "failed"]
    assert [r["id"] for r in lost] == ["q1", "q2"] and all("no worker returned it" in r["error"] for r in lost)

    stopped = Accounting(MetadataWriter(open_storage(str(tmp_path / "meta2")), "run2"))
    stopped.close(control, stopped=True, stalled=None, plan_again=lambda: pytest.fail("a stop plans nothing again"))
    assert stopped.counts == Counter(left=3)  # planned 3, none returned: left for the next run


def test_the_status_file_says_what_the_run_made_and_what_its_limit_leaves(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model)
    ledger = RunLedger(spec, "run1", on_lost=print)
    tally = Accounting(ledger.writer)
    limits = Limits(None, 3600, lambda reason: True)
    limits.arm()
    seen: list[tuple[Counter[str], int]] = []
    status = RunStatus(ledger, tally, limits, lambda counts, total: seen.append((Counter(counts), total)), 60)
    tally.total = 3
    tally.commit([ResultRow.for_item(_items(spec)[0], Status.ok)])
    status.report(force=True)
    limits.cancel()
    written = json.loads((Path(spec.metadata_uri) / "_status.json").read_text())
    assert written["counts"] == {"ok": 1} and written["total"] == 3 and written["remaining"] == 2
    assert written["limit"] == "the 1h limit" and written["job"] == "t" and written["run_id"] == "run1"
    assert seen == [(Counter(ok=1), 3)]


def test_the_run_ledger_holds_the_lease_and_writes_the_record_at_start_and_end(
    tmp_path: Path, tiny_model: Path
) -> None:
    spec = _spec(tmp_path, tiny_model)
    first, second = RunLedger(spec, "run1", on_lost=print), RunLedger(spec, "run2", on_lost=print)
    first.check()
    first.open("weights")
    with pytest.raises(JobError, match=r"^output .*: .*run1"):
        second.open("weights")  # one run per output at a time
    record = Path(spec.runs_uri) / "run1.json"
    assert json.loads(record.read_text())["state"] == "running"
    first.close(lambda: {"state": "finished", "exit_code": 0})
    first.lease.release()
    assert json.loads(record.read_text())["state"] == "finished"


def test_the_rows_of_a_committed_shard_are_taken_from_the_control_actor_once(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    import ray

    spec = _spec(tmp_path, tiny_model)
    control = start_control("parts-shards", draining=False)
    tally = Accounting(RunLedger(spec, "run1", on_lost=print).writer)
    row = ResultRow.for_item(_items(spec)[0], Status.ok)
    ray.get(control.shard_rows.remote("w1", 2, [row.model_dump()]))  # 2 rows still in its open shard
    shards = ShardCommits(control, tally)
    assert shards.take() == 2 and tally.counts == Counter(ok=1)
    assert shards.take() == 2 and tally.counts == Counter(ok=1)  # taken once


def test_preflight_refuses_a_model_that_is_not_there_and_a_pool_that_cannot_fit(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    spec = _spec(tmp_path, tiny_model)
    memory, weights = worker_needs(spec)
    assert memory > 0 and weights == simulated.FINGERPRINT  # simulated: no weights read
    real = spec.model_copy(update={"simulate": None, "model": spec.model.model_copy(update={"path": tmp_path})})
    with pytest.raises(JobError, match=r"^model\.path: "):
        worker_needs(real)
    with pytest.raises(JobError, match=r"^workers\.count: 1 workers need .* 0 fit\. Lower workers\.count to 0"):
        check_memory(spec, 2**50)


def test_a_calls_steps_alone_render_on_the_device_then_judge_and_write(tmp_path: Path, tiny_model: Path) -> None:
    """The device call renders and scores consistency; the judge scores and passes it to the
    writer, which uploads it and completes the row; a gate no clip meets sends it round again."""
    spec = _spec(tmp_path, tiny_model, rows=1)
    worker = RowWorker(spec)  # the prepare step: the row and its request
    prepared = worker.prepare(_items(spec, 1)[0], attempt=1)
    assert prepared.request is not None and prepared.row.status == Status.failed  # until written
    device = DeviceCalls(worker.model, worker.renderer)
    [(rendered, video)], [similarity] = device.call([prepared])
    assert rendered is prepared and video.frames.shape[0] == prepared.row.params.num_frames
    assert device.clock.busy is not None and prepared.row.device_s and prepared.row.device_s > 0
    cpu = CpuClock()
    assert Judge(cpu, Writing(spec, open_storage(spec.output), cpu))(prepared, video, similarity) is False
    assert prepared.row.status == Status.ok and Path(prepared.row.mp4_uri.removeprefix("file://")).is_file()
    assert cpu.videos == 1
    gated = _gated(prepared, min_motion=1e9, max_tries=2)
    assert Judge(cpu, Writing(spec, open_storage(spec.output), cpu))(gated, video, similarity) is True
    assert gated.request is not None and gated.request.seed != prepared.request.seed  # its next seed


def _gated(p: Prepared, **gates: object) -> Prepared:
    """The same render, as a row whose gates no clip meets."""
    from svd_batch.schema import QualityGates

    row = p.row.model_copy(update={"params": p.row.params.model_copy(update={"quality": QualityGates(**gates)})})
    return Prepared(p.item, row, p.request)

"""Planning on Ray Data: pieces, duplicate ids, skip decisions and streaming into the workers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from svd_batch.driver import EXIT_STOPPED, load_spec
from svd_batch.ledger import KeySet, Progress
from svd_batch.manifest import Piece, cut, read_raw, survey
from svd_batch.plan import Planner
from svd_batch.planning import items_from_table, plan_dataset, prepare
from svd_batch.schema import JobSpec, ManifestRow
from tests.helpers import FAST, SIMULATE, make_image, status_counts, wait_until, write_job

LINES = [
    '{"id": "a", "image": "img/a.png"}',
    "",
    '{"id": "b", "image": "img/b.png", "seed": 7, "num_videos_per_prompt": 2}',
    "not json",
    '{"id": "c", "image": "img/c.png", "motion_bucket_id": 40}',
    '{"id": "a", "image": "img/other.png"}',  # a duplicate of a valid row
    '{"id": "d", "image": 5}',  # invalid; its id still counts as taken
    '{"id": "d", "image": "img/d.png"}',
    '{"id": 12, "image": "img/12.png", "height": 33}',  # height not a multiple of 8: invalid
    '{"id": "e", "image": "img/e.png", "num_inference_steps": 3}',
    '{"id": "f", "image": "img/f.png"}',
    '{"id": "g", "image": "img/g.png", "tags": {"k": 1}}',
]


def write_manifest(folder: Path, lines: list[str], ends: tuple[str, ...] = ("\n",)) -> Path:
    """The lines 40 times over (so every later copy is a duplicate), ended by `ends` in turn."""
    path = folder / "m.jsonl"
    text = "".join(line + ends[n % len(ends)] for n, line in enumerate(lines * 40))
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize("ends", [("\n",), ("\r\n",), ("\n", "\r", "\r\n", "\r")])
def test_pieces_cut_at_line_ends_read_as_the_whole_file_reads(tmp_path: Path, ends: tuple[str, ...]) -> None:
    path = write_manifest(tmp_path, LINES, ends)
    pieces = cut(str(path), 200)
    assert len(pieces) > 10 and pieces[0].start == 0 and pieces[-1].end in (None, path.stat().st_size)
    whole = [(n, r if isinstance(r, dict) else str(r)) for n, r in read_raw(Piece(str(path)))]
    pieced = [(n, r if isinstance(r, dict) else str(r)) for p in pieces for n, r in read_raw(p)]
    assert pieced == whole and whole[-1][0] == len(path.read_text().splitlines())  # every line numbered


def reference(path: Path, job: JobSpec, done: set[str], final: set[str], retry_failed: bool) -> list[tuple]:
    """The semantics written out plainly: per line, its error field or its videos' keys and seeds."""
    planner = Planner(job, str(path), "run", "w")
    taken: set[str] = set()
    expected = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            expected.append((number, "error", "(line)"))
            continue
        row_id = str(raw["id"])
        duplicate, _ = row_id in taken, taken.add(row_id)
        try:
            row = ManifestRow.model_validate({**raw, "id": row_id})
        except ValueError as exc:
            field = str(exc).splitlines()[1]
            expected.append((number, "error", field))
            continue
        if duplicate:
            expected.append((number, "error", "id"))
            continue
        try:
            resolved = planner.resolve(row, number)
        except ValueError as exc:
            expected.append((number, "error", exc.field))  # type: ignore[attr-defined]
            continue
        for video in resolved:
            if video.key in done or (video.key in final and not retry_failed):
                expected.append((number, "skip", video.key))
            else:
                expected.append((number, video.key, video.seed))
    return expected


@pytest.mark.parametrize("retry_failed", [False, True])
def test_planning_on_ray_data_equals_the_plain_reading_row_for_row(
    tmp_path: Path, ray_cluster: object, retry_failed: bool
) -> None:
    import ray

    path = write_manifest(tmp_path, LINES)
    job = JobSpec.model_validate({"name": "p", "manifest": str(path), "output": str(tmp_path / "out"),
                                  "model": {"path": "/m"}})  # fmt: skip
    key = {number: key for number, key, _ in reference(path, job, set(), set(), retry_failed)}
    done, final = {key[5]}, {key[11]}  # rows c and f
    expected = reference(path, job, done, final, retry_failed)
    pieces, context = prepare(job, "run", "w", retry_failed, piece_bytes=300)
    assert len(pieces) > 10  # the pieces are planned by parallel tasks
    earlier = Progress(KeySet(sorted(done)), {}, KeySet(sorted(final)))
    context = dataclasses.replace(context, earlier=ray.put(earlier), control=None)
    got = []
    for block in plan_dataset(job, pieces, context).iter_batches(batch_size=None, batch_format="pyarrow"):
        assert block.num_rows <= job.workers.batch_size  # one pipeline call a block
        for item in items_from_table(block):
            if item.error is not None:
                got.append((item.line, "error", item.error.split(": ")[1]))
            else:
                got.append((item.line, item.key, item.seed))
    skips = [e for e in expected if e[1] == "skip"]
    assert sorted(got) == sorted(e for e in expected if e[1] != "skip")
    assert len(skips) == (2 if not retry_failed else 1)  # c (done) always, f (final) unless retried
    assert survey(str(path)).duplicates.size == 39 * 10 + 2  # every later copy of the 10 ids, and a, d


@pytest.mark.slow
def test_a_long_manifest_renders_while_it_is_planned_and_a_limit_leaves_the_rest(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` covers planning on Ray Data in
    test_planning_on_ray_data_equals_the_plain_reading_row_for_row, results coming back call by call
    in test_a_batch_reaches_the_driver_when_its_call_ends_not_when_the_next_one_does, and a limit
    leaving rows in test_operate.py::test_max_duration_stops_the_job."""
    make_image(tmp_path / "cat.png")
    rows = 200_000
    with (tmp_path / "m.jsonl").open("w") as out:
        out.writelines(f'{{"id": "r{n}", "image": "cat.png"}}\n' for n in range(rows))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "long",
                "manifest": "m.jsonl",
                "output": "out",
                "model": {"path": str(tiny_model)},
                "defaults": FAST,
                "workers": {"count": 1, "batch_size": 2},
            }
        )
    )
    address = ray_cluster.get_runtime_context().gcs_address  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        # Long enough for a first video on a slow machine (21–35 s on an idle one): once stopped,
        # planning counts the rest at once, and a video after the stop proves nothing.
        [sys.executable, "-m", "svd_batch.cli", "run", str(spec), "--address", address, "--max-duration", "100s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status = Path(load_spec(spec).metadata_uri) / "_status.json"
    first = wait_until(lambda: status.is_file() and json.loads(status.read_text()), "_status.json", timeout=600)
    first = wait_until(lambda: (s := json.loads(status.read_text()))["counts"].get("ok") and s, "a first video")
    assert first["total"] < rows  # a video was committed while the manifest was still being planned
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    counts = status_counts(spec)
    assert counts["ok"] >= 1 and counts["ok"] + counts["left"] == rows and set(counts) == {"ok", "left"}
    assert json.loads(status.read_text())["total"] == rows


def test_a_batch_reaches_the_driver_when_its_call_ends_not_when_the_next_one_does(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """Ray Data's prefetcher hands on a block only once the next one is ready: the results of
    one call would wait for the next call (a whole batch late to the ledger, and to the first
    video). The second batch here is held until the first one's rows have come back. On a
    simulated device: the stream's timing is Ray Data's, not the model's."""
    import ray

    from svd_batch.render import render, start_control

    spec_path = write_job(tmp_path, [{"id": f"r{n}", "image": "cat.png"} for n in range(2)], tiny_model,
                          workers={"count": 1, "batch_size": 1}, simulate=SIMULATE)  # fmt: skip
    make_image(tmp_path / "cat.png")
    spec = load_spec(spec_path)
    control = start_control("hold", draining=False)
    pieces, context = prepare(spec, "hold", "w")
    tables = list(plan_dataset(spec, pieces, context).iter_batches(batch_size=None, batch_format="pyarrow"))
    items = ray.data.from_arrow([pa.concat_tables(tables).slice(n, 1) for n in range(2)])
    flag, gave_up = tmp_path / "flag", tmp_path / "gave-up"

    def hold_second(batch: pa.Table) -> pa.Table:  # defined here: Ray pickles it by value
        """Holds the block of row r1 until the test has seen r0's result (or 300 s have passed)."""
        if "r1" in batch.column("id").to_pylist():
            deadline = time.monotonic() + 300
            while not flag.exists():
                if time.monotonic() > deadline:
                    gave_up.touch()
                    break
                time.sleep(0.1)
        return batch

    held = items.map_batches(hold_second, batch_format="pyarrow")
    seen = []
    for batch in render(spec, "hold", held, worker_memory=0):
        seen += zip(batch.column("id").to_pylist(), batch.column("status").to_pylist(), strict=True)
        if not flag.exists():
            assert not gave_up.exists(), "the first call's rows came back only after the second call"
            flag.touch()
    ray.kill(control)
    assert sorted(seen) == [("r0", "ok"), ("r1", "ok")]

"""Quality gates on real jobs: best of N seeds, rejected rows, gates in the key."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from svd_batch.plan import derive_seed, retry_seed
from tests.helpers import results, rows_and_images, run_job, write_job

NEVER = 1e9  # a motion no clip has


def videos(folder: Path) -> set[str]:
    return {str(p) for p in (folder / "outputs" / "videos").rglob("*.mp4")}


@pytest.mark.slow
def test_gated_rows_end_ok_or_rejected_within_max_tries_and_rejected_is_done_until_gates_change(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` runs a gated job, its clips ok or rejected, in
    test_shards.py::test_a_gated_job_writes_only_its_ok_clips_as_shards_that_webdataset_and_ray_data_read."""
    rows = rows_and_images(tmp_path, 3)
    spec = write_job(tmp_path, rows, tiny_model, quality={"min_motion": NEVER, "max_tries": 2})
    assert run_job(spec) == Counter(rejected=3)
    df = results(spec)
    assert (df.tries == 2).all() and df.mp4_uri.isna().all() and not videos(tmp_path)
    for row in df.itertuples():
        first = derive_seed(3, row.id)
        assert [t["seed"] for t in row.try_scores] == [first, retry_seed(first, 1)]
        assert [list(t["failed_gates"]) for t in row.try_scores] == [["min_motion"]] * 2
        assert row.seed == first and list(row.failed_gates) == ["min_motion"]  # ties keep the first try
        # Two seeds, two clips: each try's own scores are recorded.
        assert row.try_scores[0]["scores"]["sharpness"] != row.try_scores[1]["scores"]["sharpness"]
        assert row.score_sharpness == row.try_scores[0]["scores"]["sharpness"]
    assert run_job(spec) == Counter(skipped=3)  # rejected under the same gates: done

    # New gates are new keys: judged again, and kept this time.
    write_job(tmp_path, rows, tiny_model, quality={"min_motion": NEVER, "max_tries": 3, "keep_rejected": True})
    assert run_job(spec) == Counter(rejected=3)
    again = results(spec).query("tries == 3")
    assert len(again) == 3 and again.mp4_uri.notna().all()
    assert {u.removeprefix("file://") for u in again.mp4_uri} == videos(tmp_path)


@pytest.mark.slow
def test_a_row_that_misses_a_gate_is_rendered_again_with_its_next_seed_until_it_passes(
    tmp_path: Path, tiny_model: Path, ray_cluster: object
) -> None:
    """`make test` runs a gated job in
    test_shards.py::test_a_gated_job_writes_only_its_ok_clips_as_shards_that_webdataset_and_ray_data_read,
    whose rows are rendered again with their next seeds up to max_tries.

    Gates set between a row's first two clips: the first misses, the second passes."""
    rows = rows_and_images(tmp_path, 3)
    spec = write_job(tmp_path, rows, tiny_model, quality={"min_motion": NEVER, "max_tries": 2})
    run_job(spec)
    tries = {r.id: [t["scores"]["sharpness"] for t in r.try_scores] for r in results(spec).itertuples()}
    gated = []
    for row in rows:
        first, second = tries[row["id"]]
        side = "min" if second > first else "max"
        gated.append({**row, "quality": {f"{side}_sharpness": (first + second) / 2}})
    write_job(tmp_path, gated, tiny_model, output="passed", quality={"max_tries": 2})
    assert run_job(spec) == Counter(ok=3)
    df = results(spec)
    assert (df.tries == 2).all() and df.mp4_uri.notna().all()
    for row in df.itertuples():
        assert row.seed == retry_seed(derive_seed(3, row.id), 1)  # the seed that passed
        assert list(row.failed_gates) == [] and [list(t["failed_gates"]) for t in row.try_scores][1] == []
        assert row.score_sharpness == pytest.approx(tries[row.id][1], rel=1e-3)

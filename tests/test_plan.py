"""Planning, as unit tests: keys, URI joins, seeds, sweeps; nothing is rendered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from svd_batch.ledger import KeySet, Progress
from svd_batch.manifest import validate
from svd_batch.plan import MAX_SEED, RETRY_SEEDS, Planner, RowError, derive_seed, join_uri, retry_seed
from svd_batch.schema import ClipScores, JobSpec, ManifestRow, QualityGates

NOTHING = Progress(frozenset(), {}, frozenset())


def spec(**fields: object) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "p", "manifest": "/data/m.jsonl", "output": "/out", "model": {"path": "/m"}, **fields}
    )


def keys(job: JobSpec, *rows: dict, weights: str = "w1") -> list[str]:
    planner = Planner(job, job.manifest, "run", weights)
    return [i.key for n, r in enumerate(rows, 1) for i in planner.resolve(ManifestRow.model_validate(r), n)]


def test_keys_are_stable_and_change_with_what_shapes_the_video() -> None:
    row = {"id": "a", "image": "img/a.png"}
    (key,) = keys(spec(), row)
    assert key.startswith("videos/a-") and key.endswith("-v0") and keys(spec(), row) == [key]
    assert keys(spec(), {**row, "fps": 8}) != [key]
    assert keys(spec(), {**row, "seed": 5}) != [key]
    assert keys(spec(), {**row, "image": "img/b.png"}) != [key]
    assert keys(spec(), row, weights="w2") != [key]  # new weights at the same path: new videos
    assert keys(spec(model={"path": "/elsewhere"}), row) == [key]  # the same weights moved: same videos
    assert keys(spec(formats=["mp4", "gif"]), row) == [key]  # formats are what done means, not the key
    assert keys(spec(), {**row, "tags": {"x": 1}}) == [key]  # tags describe, they do not shape


def test_gates_are_in_the_key_only_when_set_and_a_rows_gates_refine_the_jobs() -> None:
    row = {"id": "a", "image": "img/a.png"}
    # The key an ungated row had before gates existed (svd-batch 0.1, stop 20): kept, so no
    # finished job renders again after an upgrade.
    assert keys(spec(), row) == ["videos/a-c2af42ae01a14a92-v0"]
    gated = keys(spec(quality={"min_motion": 0.5}), row)
    assert gated != keys(spec(), row)
    assert keys(spec(quality={"min_motion": 0.6}), row) != gated
    assert keys(spec(quality={"min_motion": 0.5, "max_tries": 3}), row) != gated
    assert keys(spec(), {**row, "quality": {"min_motion": 0.5}}) == gated  # a row's own gates: the same
    planner = Planner(spec(quality={"min_motion": 0.5, "max_tries": 3}), "/data/m.jsonl", "run", "w")
    (item,) = planner.resolve(ManifestRow.model_validate({**row, "quality": {"max_flicker": 4}}), 1)
    assert item.params.quality == QualityGates(min_motion=0.5, max_flicker=4, max_tries=3)


def test_gates_name_what_a_clip_missed() -> None:
    gates = QualityGates(min_motion=0.5, max_flicker=8, min_consistency=0.7)
    assert gates.failed(ClipScores(motion=1.0, flicker=2.0, consistency=0.9)) == []
    assert gates.failed(ClipScores(motion=0.1, flicker=9.0, consistency=0.9)) == ["min_motion", "max_flicker"]
    assert gates.failed(ClipScores(motion=None, flicker=None, consistency=0.5)) == [
        "min_motion",
        "max_flicker",
        "min_consistency",
    ]  # a one-frame clip: what cannot be measured does not pass
    assert QualityGates().failed(ClipScores()) == []
    with pytest.raises(ValidationError, match="min_moton"):
        QualityGates.model_validate({"min_moton": 1})


def test_retry_seeds_stay_above_every_derived_seed_and_apart() -> None:
    seeds = {retry_seed(s, t) for s in (0, 1, 2**40, derive_seed(0, "a")) for t in range(1, 16)}
    assert len(seeds) == 60 and all(RETRY_SEEDS <= s <= MAX_SEED for s in seeds)
    assert all(derive_seed(0, r) + 63 < RETRY_SEEDS for r in map(str, range(1000)))
    assert retry_seed(7, 1) == retry_seed(7, 1) != retry_seed(7, 2)


def test_relative_references_join_the_manifest_folder_and_absolute_ones_stay() -> None:
    assert join_uri("/data", "img/../img/a.png") == "/data/img/a.png"
    assert join_uri("s3://b/m", "img/a.png") == "s3://b/m/img/a.png"
    assert join_uri("/data", "s3://other/x.png") == "s3://other/x.png"
    assert join_uri("s3://b/m", "/abs/x.png") == "/abs/x.png"
    planner = Planner(spec(), "/data/m.jsonl", "run", "w")
    (item,) = planner.resolve(ManifestRow(id="a", image="img/a.png", latents="l/a.npy"), 1)
    assert item.image == "/data/img/a.png" and item.params.latents == "/data/l/a.npy"


def test_seeds_are_derived_per_row_and_video_v_gets_seed_plus_v() -> None:
    assert derive_seed(0, "a") == derive_seed(0, "a") != derive_seed(0, "b") != derive_seed(1, "b")
    assert all(derive_seed(s, r) < 2**62 for s in range(50) for r in "abcdef")
    planner = Planner(spec(), "/data/m.jsonl", "run", "w")
    items = planner.resolve(ManifestRow(id="a", image="x.png", num_videos_per_prompt=3), 1)
    assert [i.seed for i in items] == [derive_seed(0, "a") + v for v in range(3)]
    assert [i.video_index for i in items] == [0, 1, 2]


def test_a_seed_whose_videos_pass_int64_fails_its_row_naming_the_fix() -> None:
    planner = Planner(spec(), "/data/m.jsonl", "run", "w")
    assert len(planner.resolve(ManifestRow(id="a", image="x.png", seed=MAX_SEED), 1)) == 1
    with pytest.raises(
        RowError, match=r"seed: seed 9223372036854775807 \+ num_videos_per_prompt 2 .* up to 9223372036854775806"
    ):
        planner.resolve(ManifestRow(id="a", image="x.png", seed=MAX_SEED, num_videos_per_prompt=2), 7)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"seed": [1.5]}, r"sweep\.seed\[0\]: .*integer"),
        ({"seed": [2**64]}, r"sweep\.seed\[0\]: .*less than 9223372036854775808"),
        ({"fps": [7, 0]}, r"sweep\.fps\[1\]: .*greater than 0"),
        ({"fit": ["squash"]}, r"sweep\.fit\[0\]: .*'crop', 'pad' or 'stretch'"),
    ],
)
def test_sweep_values_are_checked_as_row_values_are(sweep: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(sweep=sweep)


def test_a_sweep_multiplies_rows_with_values_typed_as_a_row_would_type_them() -> None:
    job = spec(sweep={"seed": ["1", 2], "motion_bucket_id": [10, 20]})
    planner = Planner(job, job.manifest, "run", "w")
    items = planner.resolve(ManifestRow(id="a", image="x.png"), 1)
    assert sorted((i.id, i.seed, i.params.motion_bucket_id) for i in items) == [
        ("a[seed=1,motion_bucket_id=10]", 1, 10),
        ("a[seed=1,motion_bucket_id=20]", 1, 20),
        ("a[seed=2,motion_bucket_id=10]", 2, 10),
        ("a[seed=2,motion_bucket_id=20]", 2, 20),
    ]


def test_planning_skips_done_and_final_keys_and_keeps_what_a_partial_key_has(tmp_path: Path) -> None:
    job = spec()
    planner = Planner(job, job.manifest, "run", "w")
    rows = [(n, ManifestRow(id=i, image="x.png")) for n, i in enumerate("abcd", 1)] + [
        (5, RowError(5, None, "id", "x"))
    ]
    key = {i.id: i.key for n, r in rows[:4] for i in planner.resolve(r, n)}
    earlier = Progress(KeySet([key["a"]]), {key["c"]: {"mp4_uri": "file:///c.mp4"}}, KeySet([key["d"]]))
    planned = list(planner.plan(rows, earlier, retry_failed=False))
    assert planned[0] is None and planned[3] is None and isinstance(planned[4], RowError)
    assert planned[1].key == key["b"] and planned[1].kept == {}
    assert planned[2].kept == {"mp4_uri": "file:///c.mp4"}
    assert [p.id for p in planner.plan(rows, earlier, retry_failed=True) if p and not isinstance(p, RowError)] == [
        "b",
        "c",
        "d",
    ]


def test_captions_and_passthrough_columns_reach_the_work_item_unchanged_and_never_the_key() -> None:
    job = spec(passthrough=["src", "rank"], sweep={"motion_bucket_id": [10, 20]})
    planner = Planner(job, job.manifest, "run", "w")
    raw = {"id": "a", "image": "x.png", "caption": "a fox", "src": {"url": "u", "at": [1, None]}, "rank": 2.5}
    row = validate(1, dict(raw), (), job.passthrough)
    items = [i.work_item() for i in planner.resolve(row, 1)]
    assert len(items) == 2 and {i.caption for i in items} == {"a fox"}
    assert [json.loads(i.passthrough) for i in items] == [{"src": {"url": "u", "at": [1, None]}, "rank": 2.5}] * 2
    plain = validate(1, {"id": "a", "image": "x.png"}, (), job.passthrough)
    assert [i.key for i in planner.resolve(row, 1)] == [i.key for i in planner.resolve(plain, 1)]
    assert plain.passthrough == {} and planner.resolve(plain, 1)[0].work_item().passthrough is None
    # Unlisted, a column is an unknown field, and the error says how to keep it.
    unlisted = validate(4, dict(raw), (), ["src"])
    assert str(unlisted) == (
        "row 4 (id 'a'): rank: unknown field; known fields: "
        + ", ".join(n for n in ManifestRow.model_fields if n not in ("passthrough", "image_bytes"))  # not columns
        + "; or list it in the job spec's passthrough to carry it into the metadata"
    )
    reserved = validate(5, {"id": "b", "image": "x.png", "passthrough": {"src": 1}}, (), ["src"])
    assert str(reserved).startswith("row 5 (id 'b'): passthrough: is not a manifest column; name the columns")


@pytest.mark.parametrize(
    ("names", "message"),
    [(["seed"], "'seed' is a column svd-batch reads itself"), (["src", "src"], "a column is listed twice")],
)
def test_passthrough_lists_only_columns_svd_batch_does_not_read(names: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=rf"passthrough\n  Value error, {message}"):
        spec(passthrough=names)

"""Planning over Arrow columns decides exactly what the per-row reader decides, line by line,
and it decides the plain rows of a rerun itself (as counts), not by handing them back."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from svd_batch import manifest as manifests
from svd_batch.columnar import Counted, plan_parquet, plan_piece, video_keys
from svd_batch.ledger import KeySet, Progress
from svd_batch.manifest import (
    Piece,
    is_parquet,
    lines_of,
    parquet_table,
    piece_data,
    read_piece,
    read_raw,
    read_table,
    survey,
)
from svd_batch.plan import Planner, RowError
from svd_batch.schema import JobSpec

PLAIN = 40  # ordinary rows around each odd one, so that pyarrow reads (or refuses) a real piece
ODD_LINE = 22  # a line the earlier run made (see earlier_of)

# Each is one manifest line among plain rows: every way a row can be read, be valid or fail.
ODD = [
    '{"id": 17, "image": "img/17.png"}',
    '{"id": "gated", "image": "img/s.png", "quality": {"max_flicker": 4}}',
    '{"id": "bad-gate", "image": "img/s.png", "quality": {"min_moton": 1}}',
    '{"id": "seeded", "image": "img/s.png", "seed": 5}',
    '{"id": "neg", "image": "img/s.png", "seed": -1}',
    '{"id": "big", "image": "img/s.png", "seed": 9223372036854775807, "num_videos_per_prompt": 2}',
    '{"id": "float-seed", "image": "img/s.png", "seed": 1.0}',
    '{"id": "h", "image": "img/h.png", "height": 64}',
    '{"id": "h-bad", "image": "img/h.png", "height": 63}',
    '{"id": "h-float", "image": "img/h.png", "height": 64.0}',
    '{"id": "g", "image": "img/g.png", "motion_bucket_id": 40, "min_guidance_scale": 1}',
    '{"id": "g-order", "image": "img/g.png", "min_guidance_scale": 5}',
    '{"id": "sig", "image": "img/g.png", "sigmas": [1, 0.5]}',
    '{"id": "fit", "image": "img/g.png", "fit": "pad"}',
    '{"id": "fit-bad", "image": "img/g.png", "fit": "bogus"}',
    '{"id": "two", "image": "img/2.png", "num_videos_per_prompt": 2}',
    '{"id": "null-h", "image": "img/2.png", "height": null}',
    '{"id": "lat", "image": "img/2.png", "latents": "lat/x.npy"}',
    '{"id": "lat-out", "image": "img/2.png", "latents": "/elsewhere/x.npy"}',
    '{"id": "t", "image": "img/t.png", "tags": {"k": 1, "s": "x"}}',
    '{"id": "t-nested", "image": "img/t.png", "tags": {"k": {"n": 1}}}',
    '{"id": "t-null", "image": "img/t.png", "tags": null}',
    '{"id": "t-null-value", "image": "img/t.png", "tags": {"a": null}}',
    '{"id": "t-str", "image": "img/t.png", "tags": "x"}',
    '{"id": "extra", "image": "img/t.png", "caption": "a cat"}',
    '{"id": "extra-null", "image": "img/t.png", "caption": null}',
    '{"id": "cap-int", "image": "img/t.png", "caption": 5}',
    '{"id": "pass", "image": "img/t.png", "src": "web", "rank": 2}',  # carried only where the spec lists them
    '{"id": "pass-obj", "image": "img/t.png", "src": {"u": [1, null]}}',
    '{"id": "pass-null", "image": "img/t.png", "src": null}',
    '{"id": "reserved", "image": "img/t.png", "passthrough": {"src": 1}}',
    '{"id": "", "image": "img/e.png"}',
    '{"id": "nul\\u0000", "image": "img/e.png"}',
    '{"id": "' + "x" * 1025 + '", "image": "img/e.png"}',
    '{"image": "img/e.png"}',
    '{"id": null, "image": "img/e.png"}',
    '{"id": true, "image": "img/e.png"}',
    '{"id": 1.5, "image": "img/e.png"}',
    '{"id": 99999999999999999999, "image": "img/e.png"}',
    '{"id": "no-image"}',
    '{"id": "empty-image", "image": ""}',
    '{"id": "abs", "image": "/etc/passwd"}',
    '{"id": "up", "image": "../x.png"}',
    '{"id": "dot", "image": "img/./d.png"}',
    '{"id": "slashes", "image": "img//d.png"}',
    '{"id": "dir", "image": "img/"}',
    '{"id": "row-00003", "image": "img/dup.png"}',  # the id of a plain row before it
    '{"id": "café ü", "image": "img/u.png"}',
    '{"id": ".hidden_", "image": "img/u.png"}',
    '{"id": "a b", "image": "img/u.png"}',
    "",
    "   ",
    "not json",
    "[1]",
    '{"id": "one", "image": "img/o.png"} {"id": "two-on-a-line", "image": "img/o.png"}',
    '{"id": "twice", "id": "again", "image": "img/o.png"}',
    '{"id": "sur\\ud800", "image": "img/o.png"}',
    '{"id": "smile \\ud83d\\ude00", "image": "img/o.png"}',
    '{"id": "nan", "image": "img/o.png", "seed": NaN}',
]


def manifest(folder: Path, odd: str, end: str = "\n", bom: bool = False) -> Path:
    rows = [json.dumps({"id": f"row-{n:05d}", "image": f"img/{n % 7}.png"}) for n in range(PLAIN)]
    lines = [*rows[: ODD_LINE - 1], odd, *rows[ODD_LINE - 1 :]]
    path = folder / "m.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(line + end for line in lines).encode())
    return path


def job(path: Path, sweep: dict[str, list[Any]] | None = None, **more: Any) -> JobSpec:
    spec = {"name": "c", "manifest": str(path), "output": str(path.parent / "out"), "model": {"path": "/m"}}
    return JobSpec.model_validate({**spec, "sweep": sweep or {}, "seed": 3, **more})


def flat(planned: Any) -> list[Any]:
    """A plan stream as comparable values; a count of n skipped videos is n skips."""
    if isinstance(planned, Counted):
        return [planned.status] * planned.videos
    if planned is None:
        return ["skipped"]
    if isinstance(planned, RowError):
        return [str(planned)]
    return [planned.model_dump()]


def per_row(spec: JobSpec, piece: Piece, duplicates: frozenset[int], earlier: Progress) -> list[Any]:
    planner = Planner(spec, spec.manifest, "run", "w")
    return [v for p in planner.plan(read_piece(piece, duplicates, spec.passthrough), earlier, False) for v in flat(p)]


def columnar(
    spec: JobSpec, piece: Piece, duplicates: frozenset[int], earlier: Progress, draining: bool = False
) -> tuple[list[Any], int]:
    planner = Planner(spec, spec.manifest, "run", "w")
    if is_parquet(piece.uri):
        planned = plan_parquet(planner, piece, duplicates, earlier, False, lambda: draining)
    else:
        planned = plan_piece(planner, piece_data(piece), piece.first, duplicates, earlier, False, lambda: draining)
    stream = list(planned)
    return [v for p in stream for v in flat(p)], sum(isinstance(p, Counted) for p in stream)


def columns_of(piece: Piece) -> tuple[pa.Table | None, np.ndarray]:
    """The piece as columnar planning reads it, and the row number of each row."""
    if is_parquet(piece.uri):
        table = parquet_table(piece)
        return table, piece.first + np.arange(table.num_rows if table is not None else 0)
    data = piece_data(piece)
    lines = lines_of(data, piece.first)
    return read_table(data, lines), lines.numbers


def left(plan: list[Any]) -> list[Any]:
    """What a stopping run counts: every work item is left (planning.plan_pieces counts it)."""
    return ["left" if isinstance(v, dict) else v for v in plan]


def earlier_of(spec: JobSpec, piece: Piece, duplicates: frozenset[int]) -> Progress:
    """An earlier run that made most videos (each third row's not; each fifth row's failed for
    good), and only the first video of a two-video row. It also made the keys that columns
    give every row, valid or not: a row that only columns think valid would then be skipped."""
    fresh = Progress(KeySet([]), {}, KeySet([]))
    planner = Planner(spec, spec.manifest, "run", "w")
    rows = read_piece(piece, duplicates, spec.passthrough)
    made = [(item.line, item.key) for item in planner.plan(rows, fresh, False) if not isinstance(item, RowError)]
    table, numbers = columns_of(piece)
    if table is not None and {"id", "image"} <= set(table.column_names):
        named = pc.and_(table.column("id").is_valid(), table.column("image").is_valid())
        with contextlib.suppress(pa.ArrowException):
            keys, owner, _ = video_keys(planner, table.filter(named))
            numbers = numbers[named.to_numpy(zero_copy_only=False)]
            made += [(int(numbers[row]), key) for key, row in zip(keys, owner, strict=True)]
    made = [(line, key) for line, key in made if not (key.startswith("videos/two") and key.endswith("-v1"))]
    done = [key for line, key in made if line % 3 and line % 5]
    return Progress(KeySet(done), {}, KeySet([key for line, key in made if line % 3 and not line % 5]))


def plain_duplicates(path: Path) -> list[int]:
    """Rows whose id (a string, or an int as text) an earlier row has, read plainly."""
    seen, later = set(), []
    for number, raw in read_raw(Piece(str(path))):
        value = raw.get("id") if isinstance(raw, dict) else None
        value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(value, str):
            if value in seen:
                later.append(number)
            seen.add(value)
    return later


@pytest.mark.parametrize("odd", ODD, ids=range(len(ODD)))
@pytest.mark.parametrize(
    ("sweep", "more"),
    [
        (None, {}),
        ({"motion_bucket_id": [10, 20]}, {}),
        (None, {"quality": {"min_motion": 0.5, "max_tries": 2}}),
        (None, {"passthrough": ["src", "rank"]}),
    ],
    ids=["plain", "sweep", "gated", "passthrough"],
)
def test_each_odd_line_is_planned_exactly_as_row_by_row(tmp_path: Path, odd: str, sweep: Any, more: Any) -> None:
    path = manifest(tmp_path, odd)
    spec = job(path, sweep, **more)
    found = survey(str(path))
    assert found.duplicates.tolist() == plain_duplicates(path)
    (piece,) = found.pieces
    duplicates = frozenset(found.duplicates.tolist())
    earlier = earlier_of(spec, piece, duplicates)
    expected = per_row(spec, piece, duplicates, earlier)
    got, _ = columnar(spec, piece, duplicates, earlier)
    assert got == expected
    stopping, _ = columnar(spec, piece, duplicates, earlier, draining=True)
    assert left(stopping) == left(expected)
    assert expected.count("skipped") > PLAIN // 2  # most plain rows are done


@pytest.mark.parametrize(("end", "bom", "fast"), [("\n", False, True), ("\r\n", False, True), ("\r", False, False),
                                                 ("\n", True, False)])  # fmt: skip
def test_line_ends_and_marks_read_as_row_by_row_and_plain_pieces_are_decided_over_columns(
    tmp_path: Path, end: str, bom: bool, fast: bool
) -> None:
    path = manifest(tmp_path, '{"id": "t", "image": "img/t.png", "tags": {"k": 1}}', end, bom)
    spec = job(path)
    (piece,) = survey(str(path)).pieces
    earlier = earlier_of(spec, piece, frozenset())
    got, counted = columnar(spec, piece, frozenset(), earlier)
    assert got == per_row(spec, piece, frozenset(), earlier)
    # Where pyarrow reads the piece, done rows side by side come as one count; a piece it
    # cannot read is planned row by row, one count a video.
    assert (counted < got.count("skipped") * 2 // 3) if fast else counted == got.count("skipped")


def test_rows_are_checked_one_by_one_against_an_allow_list_narrower_than_the_manifest_folder(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, '{"id": "a", "image": "ok.png"}')  # the one row outside img/
    spec = job(path, inputs={"allow": [str(tmp_path / "img")]})
    (piece,) = survey(str(path)).pieces
    earlier = earlier_of(spec, piece, frozenset())
    got, counted = columnar(spec, piece, frozenset(), earlier)
    assert got == per_row(spec, piece, frozenset(), earlier)
    assert sum("outside inputs.allow" in g for g in got) == 1 and counted < got.count("skipped") * 2 // 3


# Each is one Parquet row among plain rows, with the column types it forces on its table: the
# ways a typed column can read as the per-row reader reads it, or not (a null cell is absent).
PARQUET_ODD: list[tuple[dict[str, Any], dict[str, pa.DataType]]] = [
    ({"id": "seeded", "image": "img/s.png", "seed": 5}, {}),
    ({"id": "neg", "image": "img/s.png", "seed": -1}, {}),
    ({"id": "s32", "image": "img/s.png", "seed": 5}, {"seed": pa.int32()}),
    ({"id": 17, "image": "img/17.png"}, {"id": pa.int64()}),
    ({"id": 17, "image": "img/17.png"}, {"id": pa.int32()}),
    ({"id": "big", "image": "img/s.png"}, {"id": pa.large_string()}),
    ({"id": None, "image": "img/e.png"}, {}),
    ({"id": "", "image": "img/e.png"}, {}),
    ({"id": "no-image", "image": None}, {}),
    ({"id": "row-00003", "image": "img/dup.png"}, {}),
    ({"id": "café ü", "image": "img/u.png"}, {}),
    ({"id": "up", "image": "../x.png"}, {}),
    ({"id": "abs", "image": "/etc/passwd"}, {}),
    ({"id": "cat", "image": "img/c.png"}, {"image": pa.dictionary(pa.int32(), pa.string())}),
    ({"id": "h", "image": "img/h.png", "height": 64}, {}),
    ({"id": "h-bad", "image": "img/h.png", "height": 63}, {}),
    ({"id": "h32", "image": "img/h.png", "height": 64}, {"height": pa.int32()}),
    ({"id": "h-huge", "image": "img/h.png", "height": 2**63 + 5}, {"height": pa.uint64()}),
    ({"id": "g", "image": "img/g.png", "min_guidance_scale": 1.5}, {}),
    ({"id": "g32", "image": "img/g.png", "min_guidance_scale": 1.5}, {"min_guidance_scale": pa.float32()}),
    ({"id": "sig", "image": "img/g.png", "sigmas": [1.0, 0.5]}, {}),
    ({"id": "fit-bad", "image": "img/g.png", "fit": "bogus"}, {}),
    ({"id": "two", "image": "img/2.png", "num_videos_per_prompt": 2}, {}),
    ({"id": "lat", "image": "img/2.png", "latents": "lat/x.npy"}, {}),
    ({"id": "t", "image": "img/t.png", "tags": {"k": 1, "s": "x"}}, {}),
    ({"id": "t-null-value", "image": "img/t.png", "tags": {"a": None, "k": 1}}, {}),
    ({"id": "t-nested", "image": "img/t.png", "tags": {"k": {"n": 1}}}, {}),
    ({"id": "extra", "image": "img/t.png", "caption": "a cat"}, {}),
    ({"id": "when", "image": "img/t.png", "at": 0}, {"at": pa.timestamp("s")}),
    ({"id": "pass", "image": "img/t.png", "src": "web"}, {}),  # the spec below carries `src`
    ({"id": "pass-f32", "image": "img/t.png", "src": 0.5}, {"src": pa.float32()}),
    ({"id": "pass-list", "image": "img/t.png", "src": [1, 2]}, {}),
    ({"id": "pass-time", "image": "img/t.png", "src": 0}, {"src": pa.timestamp("s")}),  # not JSON
    ({"id": "not-utf8", "image": "img/e.png"}, {}),  # its image becomes bytes that are not UTF-8
]


def parquet_manifest(folder: Path, odd: dict[str, Any], types: dict[str, pa.DataType], group: int = 8) -> Path:
    integer_ids = pa.types.is_integer(types.get("id", pa.string()))
    rows: list[dict[str, Any]] = [
        {"id": 1000 + n if integer_ids else f"row-{n:05d}", "image": f"img/{n % 7}.png"} for n in range(PLAIN)
    ]
    rows.insert(ODD_LINE - 1, odd)
    untyped = [{k: v for k, v in row.items() if k not in types} for row in rows]
    table = pa.Table.from_struct_array(pa.array(untyped))  # from_pylist keeps the first row's keys only
    for name, kind in types.items():
        table = table.append_column(name, pa.array([row.get(name) for row in rows], kind))
    if odd["id"] == "not-utf8":  # Parquet does not check strings on write
        data = [v.encode() for v in table.column("image").to_pylist()]
        data[ODD_LINE - 1] = b"img/\xe9.png"
        offsets = np.cumsum([0, *map(len, data)]).astype(np.int32)
        image = pa.Array.from_buffers(
            pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
        )
        table = table.set_column(table.schema.get_field_index("image"), "image", image)
    path = folder / "m.parquet"
    pq.write_table(table, path, row_group_size=group)
    return path


@pytest.mark.parametrize(("odd", "types"), PARQUET_ODD, ids=range(len(PARQUET_ODD)))
def test_each_odd_parquet_row_is_planned_exactly_as_row_by_row_in_pieces_of_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, odd: dict[str, Any], types: dict[str, pa.DataType]
) -> None:
    monkeypatch.setattr(manifests, "PIECE_ROWS", 16)  # two row groups of 8 a piece
    path = parquet_manifest(tmp_path, odd, types)
    spec = job(path, {"motion_bucket_id": [10, 20]}, passthrough=["src"])
    found = survey(str(path))
    assert [(p.start, p.end, p.first) for p in found.pieces] == [(0, 2, 1), (2, 4, 17), (4, 6, 33)]
    assert found.duplicates.tolist() == plain_duplicates(path)
    whole, duplicates = Piece(str(path)), frozenset(found.duplicates.tolist())
    earlier = earlier_of(spec, whole, duplicates)
    expected = per_row(spec, whole, duplicates, earlier)
    pieces = [columnar(spec, piece, duplicates, earlier) for piece in found.pieces]
    assert [v for got, _ in pieces for v in got] == expected
    counted = sum(c for _, c in pieces)
    # Over columns, done rows side by side come as one count (but where the table cannot be read so).
    assert counted < expected.count("skipped") * 2 // 3 or odd["id"] == "not-utf8"
    stopping = [v for piece in found.pieces for v in columnar(spec, piece, duplicates, earlier, draining=True)[0]]
    assert left(stopping) == left(expected)
    assert expected.count("skipped") > PLAIN // 2


def test_a_parquet_manifest_on_s3_is_read_a_piece_at_a_time_as_the_local_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: str
) -> None:
    import boto3

    monkeypatch.setattr(manifests, "PIECE_ROWS", 16)
    path = parquet_manifest(tmp_path, {"id": "row-00003", "image": "img/dup.png"}, {})
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="parquet-pieces")
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(path), "parquet-pieces", "m.parquet")
    local, remote = survey(str(path)), survey("s3://parquet-pieces/m.parquet")
    assert [(p.start, p.end, p.first) for p in remote.pieces] == [(p.start, p.end, p.first) for p in local.pieces]
    assert remote.duplicates.tolist() == local.duplicates.tolist() == [ODD_LINE]
    spec, duplicates = job(path), frozenset(local.duplicates.tolist())
    earlier = earlier_of(spec, Piece(str(path)), duplicates)
    for near, far in zip(local.pieces, remote.pieces, strict=True):
        assert columnar(spec, far, duplicates, earlier) == columnar(spec, near, duplicates, earlier)

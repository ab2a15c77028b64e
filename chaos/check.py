"""The invariants of a finished chaos run, from storage alone: the ledger's parts, the shards,
the objects, the run records, the lease and the report, read straight from the S3 server (never
through the fault proxy, never from what a driver said)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import imageio.v2 as imageio
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from chaos.world import BUCKET, PARAMS, World
from svd_batch.ledger import LEASE_DIR, latest, run_history
from svd_batch.metadata import part_keys
from svd_batch.schema import RESULT_SCHEMA, LeaseRecord
from svd_batch.storage import Storage, open_storage

TERMINAL = {"finished", "stopped", "failed", "lost"}


@dataclass
class Verdict:
    figures: dict[str, object] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    ledger: pa.Table | None = None  # every readable row, with the part it came from: kept beside a failed seed
    shards: dict[str, list[str]] = field(default_factory=dict)  # each shard's samples

    def fail(self, line: str) -> None:
        self.violations.append(line)


def check(world: World) -> Verdict:
    spec, verdict = world.spec, Verdict()
    meta, output = open_storage(spec.metadata_uri), open_storage(spec.output)
    table = _ledger(meta, world.broken, verdict)
    verdict.ledger = table
    table = table.drop_columns(["part"])
    rows, last = table.to_pandas(), latest(table).to_pandas()
    ids = world.manifest_ids()

    by_id = last.set_index("id")
    lost = [i for i in ids if i not in by_id.index or by_id.loc[i, "status"] not in ("ok", "rejected")]
    for i in lost[:5]:
        verdict.fail(f"lost: row {i} ends {by_id.loc[i, 'status'] if i in by_id.index else 'with no row'}")
    # A row is one result: the same row twice (a run's parts beside its merged file, until the
    # next run's repair) is one render, not two.
    results = rows.drop_duplicates(["key", "run_id", "ended_at"])
    made = results[results.status.isin(["ok", "rejected", "failed"])].groupby("key").size()
    ok_twice = results[results.status == "ok"].groupby("key").size()
    duplicated = ok_twice[ok_twice > 1]
    for key in duplicated.index[:5]:
        seen = results[(results.key == key) & (results.status == "ok")]
        runs = ", ".join(f"{r.run_id} at {r.ended_at} in {r.shard_uri}" for r in seen.itertuples())
        verdict.fail(f"duplicated: {key} ended ok {duplicated[key]} times ({runs})")

    ok = last[last.status == "ok"]
    orphans = _shards(output, ok, verdict)
    orphans += _objects(output, meta, spec.runs_uri, verdict)
    _records_and_lease(world, meta, verdict)
    counts = Counter(last.status)
    _report(world, counts, verdict)
    verdict.figures.update(
        videos=len(ids),
        ok=counts.get("ok", 0),
        rejected=counts.get("rejected", 0),
        failed=counts.get("failed", 0),
        lost=len(lost),
        duplicated=len(duplicated),
        orphans=orphans,
        rendered_again=int((made > 1).sum()),  # videos rendered more than once because a fault lost work
        ledger_rows=len(rows),
        parts_broken_by_faults=len(world.broken),
    )
    return verdict


def _ledger(meta: Storage, broken: set[str], verdict: Verdict) -> pa.Table:
    """Every readable part; the only unreadable ones allowed are those the faults broke."""
    tables = []
    for key in part_keys(meta):
        try:
            part = pq.read_table(io.BytesIO(meta.get_bytes(key))).select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
        except (OSError, ValueError, pa.ArrowException) as exc:
            if key.rsplit("/", 1)[-1] not in broken:
                verdict.fail(f"unreadable metadata part {key} that no fault broke: {exc}")
            continue
        tables.append(part.append_column("part", pa.array([key] * part.num_rows, pa.string())))
    if not tables:
        return RESULT_SCHEMA.empty_table().append_column("part", pa.array([], pa.string()))
    return pa.concat_tables(tables)


def _shards(output: Storage, ok: pd.DataFrame, verdict: Verdict) -> int:
    """Every ok video once across the shards, in the shard its row names, decodable; returns
    the shards and samples no row names."""
    named = set(zip(ok.shard_uri, ok.shard_member, strict=True))
    seen: Counter[str] = Counter()
    found: set[tuple[str, str]] = set()
    orphans = 0
    for key in sorted(k for k in output.list("shards") if k.endswith(".tar")):
        uri = output.uri(key)
        with tarfile.open(fileobj=io.BytesIO(output.get_bytes(key))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        samples = {name.split(".", 1)[0] for name in members}
        verdict.shards[uri] = sorted(samples)
        if not any(u == uri for u, _ in named):
            orphans += 1
            verdict.fail(f"orphan shard {uri}: no row names it")
            continue
        for sample in samples:
            seen[sample] += 1
            found.add((uri, sample))
            if (uri, sample) in named:
                _decodable(members.get(f"{sample}.mp4"), f"{uri}#{sample}", verdict)
    for sample, n in seen.items():
        if n > 1:
            verdict.fail(f"sample {sample} is in {n} shards")
    for uri, sample in sorted(named - found)[:5]:
        verdict.fail(f"missing: {sample} is not in {uri}, which its row names")
    for uri, sample in sorted(found - named)[:5]:
        orphans += 1
        verdict.fail(f"orphan sample {sample} in {uri}: no ok row names it")
    index = pq.read_table(io.BytesIO(output.get_bytes("shards/index.parquet"))).to_pandas()
    if set(zip(index["shard"], index["member"], index["key"], strict=True)) != set(
        zip(ok.shard_uri, ok.shard_member, ok.key, strict=True)
    ):
        verdict.fail("shards/index.parquet differs from the ledger's ok rows")
    return orphans


def _decodable(data: bytes | None, where: str, verdict: Verdict) -> None:
    if data is None:
        verdict.fail(f"{where}: no mp4 member")
        return
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        Path(file.name).write_bytes(data)
        try:
            frames = imageio.mimread(file.name)
        except Exception as exc:  # whatever the decoder says, the video is bad
            verdict.fail(f"{where}: not decodable ({exc})")
            return
    shape = (PARAMS["height"], PARAMS["width"], 3)
    if len(frames) != PARAMS["num_frames"] or any(f.shape != shape for f in frames):
        verdict.fail(f"{where}: {len(frames)} frames of {frames[0].shape if frames else None}, not 4 of {shape}")


def _objects(output: Storage, meta: Storage, runs_uri: str, verdict: Verdict) -> int:
    """Nothing in the output prefix that no row, record or the job's own files account for,
    and no upload left half done."""
    allowed = re.compile(r"(shards/.*\.tar|shards/index\.parquet|report\.html|metadata/.*|runs/.*)")
    strays = [k for k in output.list() if not allowed.fullmatch(k)]
    for key in strays[:5]:
        verdict.fail(f"orphan object {output.uri(key)}")
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    for upload in uploads[:5]:
        verdict.fail(f"multipart upload left open: {upload['Key']}")
    return len(strays) + len(uploads)


def _records_and_lease(world: World, meta: Storage, verdict: Verdict) -> None:
    records = run_history(open_storage(world.spec.runs_uri))
    for record in records:
        if record.state not in TERMINAL:
            verdict.fail(f"run {record.run_id} is still '{record.state}' after the night")
    generations = sorted(k for k in meta.list(LEASE_DIR) if k.endswith(".json"))
    if generations:
        holder = LeaseRecord.model_validate_json(meta.get_bytes(generations[-1]))
        if not holder.released:
            verdict.fail(f"the lease is still held by run {holder.run_id}")
    verdict.figures["runs"] = len(records)
    verdict.figures["runs_by_state"] = dict(Counter(r.state for r in records))


def _report(world: World, counts: Counter[str], verdict: Verdict) -> None:
    """The report a user builds after the night says what the checker counted."""
    done = subprocess.run(
        [sys.executable, "-m", "svd_batch.cli", "report", world.spec.output],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        verdict.fail(f"svd-batch report failed: {done.stderr.strip()[-300:]}")
        return
    page = open_storage(world.spec.output).get_bytes("report.html").decode()
    said = {k: int(v) for k, v in re.findall(r"<td class='(\w+)'>(\d+)</td>", page)}
    mine = {s: counts.get(s, 0) for s in said}
    if said != mine:
        verdict.fail(f"the report counts {said}, the ledger {mine}")

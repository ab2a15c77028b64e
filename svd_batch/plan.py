"""From validated manifest rows to work items: resolved parameters, seeds, output keys.

Keys are deterministic: the same row, image, parameters and model always map to the same
key, so a rerun finds what is done, and changing anything that shapes a video gives it a
new key (and so re-renders exactly that row).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from svd_batch.schema import JobSpec, ManifestRow, RenderParams, WorkItem, explain
from svd_batch.storage import join_uri

SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SAFE_ID_LENGTH = 64


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed when it gives none: stable across runs, machines and row order."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def safe_name(row_id: str) -> str:
    """A readable, path-safe stem; uniqueness comes from the digest beside it, not from this."""
    name = SAFE_CHARS.sub("_", unicodedata.normalize("NFKC", row_id)).strip("._")
    return name[:SAFE_ID_LENGTH] or "row"


def output_stem(row_id: str, image: str, seed: int, params: RenderParams, model: dict[str, Any]) -> str:
    shaping = {"id": row_id, "image": image, "seed": seed, "params": params.model_dump(mode="json"), "model": model}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    return f"videos/{safe_name(row_id)}-{digest}"


def model_identity(spec: JobSpec) -> dict[str, Any]:
    return {"path": str(spec.model.path), "dtype": spec.model.dtype, "variant": spec.model.variant}


class RowError(ValueError):
    """A manifest row that cannot be rendered: row number, id, field, reason with the fix."""

    def __init__(self, line: int, row_id: str | None, field: str, reason: str) -> None:
        self.line, self.row_id, self.field, self.reason = line, row_id, field, reason
        super().__init__(f"row {line} (id {row_id!r}): {field}: {reason}")


def resolve(row: ManifestRow, line: int, spec: JobSpec, manifest_uri: str, run_id: str) -> list[WorkItem]:
    """The work items (one per output video) of a valid row."""
    try:
        params = RenderParams.model_validate({**spec.defaults.model_dump(), **row.overrides()})
    except ValidationError as exc:
        field, reason = explain(exc, RenderParams)[0]
        raise RowError(line, row.id, field, reason) from None
    if params.latents is not None:
        params = params.model_copy(update={"latents": join_uri(manifest_uri, params.latents)})
    image = join_uri(manifest_uri, row.image)
    seed = row.seed if row.seed is not None else derive_seed(spec.seed, row.id)
    model = model_identity(spec)
    stem = output_stem(row.id, image, seed, params, model)
    tags = json.dumps(row.tags, sort_keys=True) if row.tags else None
    return [
        WorkItem(
            job=spec.name,
            run_id=run_id,
            id=row.id,
            video_index=v,
            key=f"{stem}-v{v}",
            image=image,
            # Video v of a row is exactly what a one-video row with seed + v would render.
            seed=seed + v,
            params=params,
            tags=tags,
        )
        for v in range(params.num_videos_per_prompt)
    ]


def pending(
    items: Iterable[WorkItem], done: set[str], retry_failed: bool, failed: set[str]
) -> Iterator[tuple[WorkItem, bool]]:
    """(item, is_done) for each item: done ones are skipped; failed ones only with retry_failed."""
    for item in items:
        if item.key in done or (item.key in failed and not retry_failed):
            yield item, True
        else:
            yield item, False

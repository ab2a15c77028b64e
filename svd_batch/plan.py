"""From validated manifest rows to work items: resolved parameters, seeds, output keys.

Keys are deterministic: the same row, image, parameters and model always map to the same
key, so a rerun finds what is done, and changing anything that shapes a video gives it a
new key (and so re-renders exactly that row). Planning touches every manifest row, so the
per-row work is kept to string operations and dictionary lookups: parameter sets, which
rows mostly share, are validated and serialised once.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import json
import posixpath
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from svd_batch.inputs import InputError, InputPolicy, manifest_dir
from svd_batch.schema import JobSpec, ManifestRow, RenderParams, WorkItem, explain

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


def join_uri(base_dir: str, reference: str) -> str:
    if reference.startswith(("s3://", "file://", "/")):
        return reference
    if base_dir.startswith("s3://"):
        return f"{base_dir}/{posixpath.normpath(reference)}"
    return posixpath.normpath(posixpath.join(base_dir, reference))


class RowError(ValueError):
    """A manifest row that cannot be rendered: row number, id, field, reason with the fix."""

    def __init__(self, line: int, row_id: str | None, field: str, reason: str) -> None:
        self.line, self.row_id, self.field, self.reason = line, row_id, field, reason
        super().__init__(f"row {line} (id {row_id!r}): {field}: {reason}")


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True)
class Resolved:
    """One planned video. Most of a rerun's rows are only looked up and skipped, so this stays
    a plain record; a WorkItem (validated, sent to a worker) is made only for rows to render."""

    job: str
    run_id: str
    line: int
    id: str
    video_index: int
    key: str
    image: str
    seed: int
    params: RenderParams
    params_record: dict[str, Any]
    tags: dict[str, Any]

    def work_item(self) -> WorkItem:
        return WorkItem(
            job=self.job,
            run_id=self.run_id,
            line=self.line,
            id=self.id,
            video_index=self.video_index,
            key=self.key,
            image=self.image,
            seed=self.seed,
            params=self.params,
            tags=json.dumps(self.tags, sort_keys=True) if self.tags else None,
        )

    def record(self, status: str, error: str | None, ended_at: dt.datetime) -> dict[str, Any]:
        """A skipped row (ResultRow's fields; the rest null) without building a model. The row
        that made the video, in an earlier run, carries its outputs and tags."""
        return {
            "job": self.job,
            "run_id": self.run_id,
            "id": self.id,
            "video_index": self.video_index,
            "key": self.key,
            "status": status,
            "error": error,
            "seed": self.seed,
            "params": self.params_record,
            "image": self.image,
            "ended_at": ended_at,
        }


class Planner:
    def __init__(self, spec: JobSpec, manifest_uri: str, run_id: str) -> None:
        self.spec, self.run_id = spec, run_id
        self.base = spec.manifest_base or manifest_dir(manifest_uri)
        self.inputs = InputPolicy.for_spec(spec)
        self.defaults = spec.defaults.model_dump()
        model = {"path": str(spec.model.path), "dtype": spec.model.dtype, "variant": spec.model.variant}
        self.model_json = json.dumps(model, sort_keys=True)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one planner per job; the cache dies with it)
    def _params(self, overrides: tuple[tuple[str, Any], ...]) -> tuple[RenderParams, str, dict[str, Any]]:
        params = RenderParams.model_validate({**self.defaults, **dict(overrides)})
        if params.latents is not None:
            params = params.model_copy(update={"latents": join_uri(self.base, params.latents)})
        return params, params.model_dump_json(), params.model_dump()

    def resolve(self, row: ManifestRow, line: int) -> list[Resolved]:
        """The work items (one per output video) of a valid row, after the spec's sweep."""
        sweep = self.spec.sweep
        if not sweep:
            return self._resolve(row, line)
        items = []
        for values in itertools.product(*sweep.values()):
            combo = dict(zip(sweep, values, strict=True))
            label = ",".join(f"{k}={v}" for k, v in combo.items())
            items += self._resolve(row.model_copy(update={**combo, "id": f"{row.id}[{label}]"}), line)
        return items

    def _resolve(self, row: ManifestRow, line: int) -> list[Resolved]:
        overrides = tuple(sorted((k, _freeze(v)) for k, v in row.overrides().items()))
        try:
            params, params_json, params_record = self._params(overrides)
        except ValidationError as exc:
            field, reason = explain(exc, RenderParams)[0]
            raise RowError(line, row.id, field, reason) from None
        image = join_uri(self.base, row.image)
        for field, uri in (("image", image), ("latents", params.latents)):
            try:
                if uri is not None:
                    self.inputs.check(uri)
            except InputError as exc:
                raise RowError(line, row.id, field, str(exc)) from None
        seed = row.seed if row.seed is not None else derive_seed(self.spec.seed, row.id)
        shaping = "\x00".join((row.id, image, str(seed), params_json, self.model_json))
        stem = f"videos/{safe_name(row.id)}-{hashlib.sha256(shaping.encode()).hexdigest()[:16]}"
        return [
            # Video v of a row is exactly what a one-video row with seed + v would render.
            Resolved(
                self.spec.name,
                self.run_id,
                line,
                row.id,
                v,
                f"{stem}-v{v}",
                image,
                seed + v,
                params,
                params_record,
                row.tags,
            )
            for v in range(params.num_videos_per_prompt)
        ]

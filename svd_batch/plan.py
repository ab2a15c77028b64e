"""From validated manifest rows to work items: resolved parameters, seeds, output keys.

Keys are deterministic: the same row, image, parameters and model always map to the same
key, so a rerun finds what is done, and changing anything that shapes a video gives it a
new key (and so re-renders exactly that row). Planning touches every manifest row, so the
per-row work is kept to string operations and dictionary lookups: parameter sets, which
rows mostly share, are validated and serialised once.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from svd_batch.inputs import InputError, InputPolicy, manifest_dir
from svd_batch.ledger import Progress
from svd_batch.schema import JobSpec, ManifestRow, QualityGates, RenderParams, WorkItem, explain

SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SAFE_ID_LENGTH = 64


MAX_SEED = 2**63 - 1  # seeds are int64 in the metadata


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed when it gives none: stable across runs, machines and row order. Below 2**62,
    so seed + video index (at most 63) always stays a valid int64."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


# Tries after the first render above every seed a row gets without setting one (derive_seed plus
# a video index), so a gated row's next seed never repeats another row's first.
RETRY_SEEDS = 2**62 + 64


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of try `attempt` (1, 2, ...) of a gated video whose first seed is `seed`."""
    digest = hashlib.sha256(f"{seed}\x00{attempt}".encode()).digest()
    return RETRY_SEEDS + (int.from_bytes(digest[:8], "big") >> 3)


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


def freeze(value: Any) -> Any:
    """A hashable stand-in for a parameter value (they are cache keys); an object read from
    columns (a row's `quality`) becomes pairs, which validation refuses: such a row is read
    row by row."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
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
    tags: dict[str, Any]
    caption: str | None
    passthrough: dict[str, Any]
    image_bytes: bytes | None = None  # a dataset manifest's image (samples.py)

    def work_item(self, kept: dict[str, str] | None = None) -> WorkItem:
        return WorkItem(
            job=self.job,
            run_id=self.run_id,
            line=self.line,
            id=self.id,
            video_index=self.video_index,
            key=self.key,
            image=self.image,
            image_bytes=self.image_bytes,
            seed=self.seed,
            params=self.params,
            tags=json.dumps(self.tags, sort_keys=True) if self.tags else None,
            caption=self.caption,
            passthrough=json.dumps(self.passthrough) if self.passthrough else None,
            kept=kept or {},
        )


class Planner:
    """`weights`: the model's fingerprint (loader.fingerprint). Keys name the weights, not their
    path: the same checkpoint moved keeps its videos, new weights at the same path do not."""

    def __init__(self, spec: JobSpec, manifest_uri: str, run_id: str, weights: str) -> None:
        self.spec, self.run_id = spec, run_id
        self.base = spec.manifest_base or manifest_dir(manifest_uri)
        self.inputs = InputPolicy.for_spec(spec)
        self.defaults = spec.defaults.model_dump()
        if spec.quality is not None:
            self.defaults["quality"] = spec.quality.model_dump()
        model = {"weights": weights, "dtype": spec.model.dtype, "variant": spec.model.variant}
        self.model_json = json.dumps(model, sort_keys=True)

    def plan(
        self, rows: Iterable[tuple[int, ManifestRow | RowError]], earlier: Progress, retry_failed: bool
    ) -> Iterator[WorkItem | RowError | None]:
        """Per output video of the manifest: its work item, the RowError of its row, or None
        when an earlier run made it (or it failed for good and `retry_failed` is off)."""
        for number, row in rows:
            try:
                if isinstance(row, RowError):
                    raise row
                items = self.resolve(row, number)
            except RowError as exc:
                yield exc
                continue
            for item in items:
                if item.key in earlier.done or (item.key in earlier.final and not retry_failed):
                    yield None
                else:
                    yield item.work_item(earlier.kept.get(item.key))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one planner per job; the cache dies with it)
    def _params(self, overrides: tuple[tuple[str, Any], ...]) -> tuple[RenderParams, str]:
        given = dict(overrides)
        if isinstance(given.get("quality"), QualityGates) and self.defaults["quality"] is not None:
            # A row's gates refine the job's, gate by gate.
            given["quality"] = {**self.defaults["quality"], **given["quality"].model_dump(exclude_unset=True)}
        params = RenderParams.model_validate({**self.defaults, **given})
        if params.latents is not None:
            params = params.model_copy(update={"latents": join_uri(self.base, params.latents)})
        # Ungated parameters serialise as before gates existed, so existing keys stay.
        return params, params.model_dump_json(exclude=None if params.quality else {"quality"})

    def resolve(self, row: ManifestRow, line: int) -> list[Resolved]:
        """The work items (one per output video) of a valid row, after the spec's sweep."""
        if not self.spec.sweep:
            return self._resolve(row, line)
        items = []
        for label, combo in self.sweep_points:
            items += self._resolve(row.model_copy(update={**combo, "id": f"{row.id}[{label}]"}), line)
        return items

    @functools.cached_property
    def sweep_points(self) -> list[tuple[str, dict[str, Any]]]:
        """Each point of the spec's sweep: its id label and the parameters it sets."""
        sweep = self.spec.sweep
        points = []
        for values in itertools.product(*sweep.values()):
            combo = dict(zip(sweep, values, strict=True))
            points.append((",".join(f"{k}={v}" for k, v in combo.items()), combo))
        return points

    def _resolve(self, row: ManifestRow, line: int) -> list[Resolved]:
        overrides = tuple(sorted((k, freeze(v)) for k, v in row.overrides().items()))
        image, seed, params, stem = self.shape(line, row.id, row.image, row.seed, overrides)
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
                row.tags,
                row.caption,
                row.passthrough,
                row.image_bytes,
            )
            for v in range(params.num_videos_per_prompt)
        ]

    def shape(
        self, line: int, row_id: str, image_ref: str, row_seed: int | None, overrides: tuple[tuple[str, Any], ...]
    ) -> tuple[str, int, RenderParams, str]:
        """What shapes a row's videos: its image URI, first seed, parameters and key stem
        (each video's key is the stem and its index). Raises the row's RowError."""
        params, params_json = self.params(line, row_id, overrides)
        image = self.checked(line, row_id, "image", join_uri(self.base, image_ref))
        if params.latents is not None:
            self.checked(line, row_id, "latents", params.latents)
        seed = row_seed if row_seed is not None else derive_seed(self.spec.seed, row_id)
        if seed + params.num_videos_per_prompt - 1 > MAX_SEED:
            reason = (
                f"seed {seed} + num_videos_per_prompt {params.num_videos_per_prompt} - 1 passes 2**63 - 1 "
                f"(video v gets seed + v); use a seed up to {MAX_SEED - params.num_videos_per_prompt + 1}"
            )
            raise RowError(line, row_id, "seed", reason)
        return image, seed, params, self.stem(row_id, safe_name(row_id), image, seed, params_json)

    def params(self, line: int, row_id: str, overrides: tuple[tuple[str, Any], ...]) -> tuple[RenderParams, str]:
        try:
            return self._params(overrides)
        except ValidationError as exc:
            field, reason = explain(exc, RenderParams)[0]
            raise RowError(line, row_id, field, reason) from None

    def checked(self, line: int, row_id: str, field: str, uri: str) -> str:
        try:
            self.inputs.check(uri)
        except InputError as exc:
            raise RowError(line, row_id, field, str(exc)) from None
        return uri

    def stem(self, row_id: str, name: str, image: str, seed: int, params_json: str) -> str:
        """`name`: safe_name(row_id), which callers that know it is the id itself pass as it is."""
        shaping = "\x00".join((row_id, image, str(seed), params_json, self.model_json))
        return f"videos/{name}-{hashlib.sha256(shaping.encode()).hexdigest()[:16]}"

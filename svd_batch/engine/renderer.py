"""Render videos with a loaded pipeline: many requests, as few pipeline calls as possible.

The pipeline takes its sampling settings once per call, but images and generators per item,
so requests that share every call-level setting (RenderParams.call_key) go through one call.
Each request is one video with its own generator; `num_videos_per_prompt` is expanded by the
caller into several requests, because the pipeline's own expansion orders image embeddings
and image latents differently when a call holds more than one image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from svd_batch.engine.loader import LoadedModel
from svd_batch.schema import RenderParams


class RenderCancelled(RuntimeError):
    pass


class OutputError(RuntimeError):
    """The pipeline returned frames that cannot be a video (NaN, all black)."""


@dataclass
class VideoRequest:
    image: Image.Image  # RGB, already at params.height x params.width
    params: RenderParams  # resolved: num_frames is set
    seed: int
    latents: np.ndarray | None = None  # (frames, channels, h, w) for this video


@dataclass
class RenderedVideo:
    frames: np.ndarray  # uint8 (frames, height, width, 3)
    denoise_s: float  # this video's share of its call
    decode_s: float
    batch: int  # videos in the call that made it


@dataclass
class Renderer:
    model: LoadedModel
    max_batch: int = 4
    cancel: threading.Event = field(default_factory=threading.Event)
    on_step: Callable[[int, int], None] | None = None

    def resolve(self, params: RenderParams) -> RenderParams:
        """Fill the model-dependent defaults and check what only the model can judge."""
        m = self.model.size_multiple
        for name in ("height", "width"):
            value = getattr(params, name)
            if value % m:
                lower, upper = max(m, value // m * m), (value // m + 1) * m
                raise ValueError(
                    f"{name} {value} is not a multiple of {m}, which this model needs; use {lower} or {upper}"
                )
        if params.num_frames is None:
            params = params.model_copy(update={"num_frames": self.model.num_frames})
        return params

    def render(self, requests: Sequence[VideoRequest]) -> list[RenderedVideo]:
        """Videos in request order."""
        results: list[RenderedVideo | None] = [None] * len(requests)
        for indices in self._calls(requests):
            for index, video in zip(indices, self._call([requests[i] for i in indices]), strict=True):
                results[index] = video
        return [r for r in results if r is not None]

    def _calls(self, requests: Sequence[VideoRequest]) -> Iterator[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.params.call_key(), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                yield indices[start : start + self.max_batch]

    def _call(self, group: list[VideoRequest]) -> list[RenderedVideo]:
        import mindspore as ms

        # 1. Check inputs
        p = group[0].params
        # 2. One generator per video: its frames depend on its seed alone, not on its batch-mates
        generators = [np.random.default_rng(r.seed) for r in group]
        latents = None
        if p.latents is not None:
            latents = ms.Tensor(np.stack([r.latents for r in group]).astype(np.float32))
        # 3. Denoise; the step callback reports progress and is where cancellation lands
        last_step = time.perf_counter()

        def step_end(pipe: object, step: int, timestep: object, kwargs: dict) -> dict:
            nonlocal last_step
            last_step = time.perf_counter()
            if self.cancel.is_set():
                raise RenderCancelled("render cancelled")
            if self.on_step is not None:
                self.on_step(step + 1, p.num_inference_steps)
            return kwargs

        start = time.perf_counter()
        frames = self.model.pipe(
            [r.image for r in group],
            height=p.height,
            width=p.width,
            num_frames=p.num_frames,
            num_inference_steps=p.num_inference_steps,
            sigmas=list(p.sigmas) if p.sigmas else None,
            min_guidance_scale=p.min_guidance_scale,
            max_guidance_scale=p.max_guidance_scale,
            fps=p.fps,
            motion_bucket_id=p.motion_bucket_id,
            noise_aug_strength=p.noise_aug_strength,
            decode_chunk_size=p.decode_chunk_size,
            num_videos_per_prompt=1,
            generator=generators,
            latents=latents,
            output_type="np",
            callback_on_step_end=step_end,
        )
        end = time.perf_counter()
        # 4. Decoded floats in [0, 1] -> uint8 frames, checked before anyone encodes them
        n = len(group)
        videos = []
        for video in np.asarray(frames):
            if not np.isfinite(video).all():
                raise OutputError("the pipeline produced NaN/inf frames")
            videos.append(
                RenderedVideo(
                    frames=(np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8),
                    denoise_s=(last_step - start) / n,
                    decode_s=(end - last_step) / n,
                    batch=n,
                )
            )
        return videos

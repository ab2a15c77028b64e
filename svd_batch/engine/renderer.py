"""Render videos with a loaded pipeline: many requests, as few pipeline calls as possible.

The pipeline takes its sampling settings once per call, but images and generators per item,
so requests that share every call-level setting (RenderParams.call_key) go through one call.
Each request is one video with its own generator; `num_videos_per_prompt` is expanded by the
caller into several requests, because the pipeline's own expansion orders image embeddings
and image latents differently when a call holds more than one image.
"""

from __future__ import annotations

import re
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


# How MindSpore and the Ascend runtime word an allocation failure (MemoryError aside). On CPU,
# MindSpore aborts the process on std::bad_alloc instead: that surfaces as a worker death.
OUT_OF_MEMORY = re.compile(
    r"out of memory|memory (?:malloc|alloc\w*) fail|more than total mem size|memory isn't enough|memory not enough",
    re.IGNORECASE,
)
BLACK = 2  # a video whose brightest pixel is at most this (of 255) is all black


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or bool(OUT_OF_MEMORY.search(str(exc)))


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
    decode_chunk_size: int  # frames per VAE decode, as used (halved after running out of memory)
    dtype: str | None = None  # set when it was computed in another dtype than the model's
    recovery: list[str] = field(default_factory=list)


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
        most = self.model.num_frames
        if params.num_frames is None:
            params = params.model_copy(update={"num_frames": most})
        elif params.num_frames > most:
            # SVD's temporal layers are trained for a fixed clip length (unet.config.num_frames):
            # longer clips run but drift, and their memory grows with the square of the length.
            raise ValueError(
                f"num_frames {params.num_frames} is more than the {most} this model was trained for; "
                f"use at most {most} (or a model with longer clips, such as SVD-XT's 25)"
            )
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
        latents = self.model.pipe(
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
            num_videos_per_prompt=1,
            generator=generators,
            latents=latents,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=step_end,
        )
        # 4. Decode apart from denoising, so that running out of memory there costs only a retry
        # of the decode, with fewer frames at a time, never the denoising steps.
        frames, chunk = self._decode(latents, p.num_frames, p.decode_chunk_size or p.num_frames)
        end = time.perf_counter()
        # 5. Floats in [0, 1] -> uint8 frames, checked before anyone encodes them
        n = len(group)
        videos = []
        for video in frames:
            pixels = (np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            if pixels.max() <= BLACK:
                raise OutputError("every frame is black")
            videos.append(RenderedVideo(pixels, (last_step - start) / n, (end - last_step) / n, n, chunk))
        return videos

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The pipeline's own CLIP image embeddings, (images, dim) float32: the conditioning it
        computes from an input, so comparing a frame's with the input's needs no other model."""
        embeddings = self.model.pipe._encode_image(list(images), 1, False)
        return embeddings.asnumpy().astype(np.float32).reshape(len(images), -1)

    def _decode(self, latents: object, num_frames: int, chunk: int) -> tuple[np.ndarray, int]:
        pipe = self.model.pipe
        while True:
            try:
                frames = pipe.decode_latents(latents, num_frames, chunk)
            except Exception as exc:
                if chunk == 1 or not is_out_of_memory(exc):
                    raise
                chunk //= 2
                continue
            # Checked before post-processing, whose clamp would turn NaN into black.
            if not np.isfinite(frames.asnumpy()).all():
                raise OutputError("the pipeline produced NaN/inf frames")
            return np.asarray(pipe.video_processor.postprocess_video(video=frames, output_type="np")), chunk

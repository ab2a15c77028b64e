"""A worker's device: the pipeline call for a batch and the image encoder's for its
consistency scores, back to back while the call holds the device (its clock counts them
busy); a failed shared call rendered again row by row, so that only the culprit fails."""

from __future__ import annotations

import threading
import time

import numpy as np

from svd_batch.device import DeviceClock
from svd_batch.engine.loader import LoadedModel
from svd_batch.engine.renderer import OutputError, RenderedVideo, Renderer, VideoRequest
from svd_batch.preparing import Prepared, fail, now
from svd_batch.schema import Stage
from svd_batch.scores import consistency


class DeviceCalls:
    def __init__(self, model: LoadedModel, renderer: Renderer) -> None:
        self.model, self.renderer = model, renderer
        self.lock = threading.Lock()  # one call holds the device at a time
        self.clock = DeviceClock()

    def call(self, pending: list[Prepared]) -> tuple[list[tuple[Prepared, RenderedVideo]], list[float | Exception]]:
        """The videos rendered (a row whose render failed is failed), and each one's consistency
        score or why it has none; the device time is shared among the rows' device_s."""
        started_at = now()
        with self.clock.computing():
            started = time.perf_counter()
            rendered = []
            for p, video in zip(pending, self._render([p.request for p in pending]), strict=True):
                if isinstance(video, Exception):
                    fail(p, Stage.render, video)
                else:
                    rendered.append((p, video))
            similarities = self._consistency(rendered)
            share = (time.perf_counter() - started) / len(pending)
        ended_at = now()
        for p in pending:
            p.row.device_s = (p.row.device_s or 0.0) + share
            p.row.device_started_at, p.row.device_ended_at = started_at, ended_at
        return rendered, similarities

    def _consistency(self, rendered: list[tuple[Prepared, RenderedVideo]]) -> list[float | Exception]:
        """Each video's consistency score, from one call of the image encoder for them all."""
        if not rendered:
            return []
        try:
            fitted = [np.asarray(p.request.image) for p, _ in rendered]  # type: ignore[union-attr]
            return list(consistency(self.renderer.image_embeddings, fitted, [video.frames for _, video in rendered]))
        except Exception as exc:
            return [exc] * len(rendered)

    def _render(self, requests: list[VideoRequest]) -> list[RenderedVideo | Exception]:
        if not requests:
            return []
        try:
            return list(self.renderer.render(requests))
        except Exception as exc:
            if len(requests) == 1:
                return [self._again_in_float32(requests[0], exc)]
        # A shared call failed: render each request alone so that only the culprit fails.
        results: list[RenderedVideo | Exception] = []
        for request in requests:
            try:
                results.extend(self.renderer.render([request]))
            except Exception as exc:
                results.append(self._again_in_float32(request, exc))
        return results

    def _again_in_float32(self, request: VideoRequest, exc: Exception) -> RenderedVideo | Exception:
        """NaN or black frames from a half-precision model are most often an overflow: one retry
        in float32. A float32 model would compute the same frames again, so it is not retried."""
        if not isinstance(exc, OutputError) or self.model.dtype == "fp32":
            return exc
        try:
            with self.model.in_float32():
                video = self.renderer.render([request])[0]
        except Exception as again:
            return OutputError(f"{exc}; again in fp32: {again}")
        video.recovery.append(f"{exc} in {self.model.dtype}; rendered again in fp32")
        video.dtype = "fp32"
        return video

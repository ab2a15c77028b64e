"""A render's verdict: scored on the CPU, then written; a gated row that missed a gate with
tries left goes round again with its next seed, and after its last try it is written
`rejected` with its best try (the one that missed the fewest gates)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from svd_batch.device import CpuClock
from svd_batch.engine.renderer import RenderedVideo
from svd_batch.plan import retry_seed
from svd_batch.preparing import Prepared, fail
from svd_batch.schema import Stage, Status, TryRecord
from svd_batch.scores import score_clip
from svd_batch.writing import Writing


class Judge:
    def __init__(self, cpu: CpuClock, writing: Writing) -> None:
        self.cpu, self.writing = cpu, writing

    def __call__(self, p: Prepared, video: RenderedVideo, similarity: float | Exception) -> bool:
        """Score a render and write the row, unless it missed a gate with tries left: then
        True, and the request carries the next seed."""
        row, request = p.row, p.request
        assert request is not None
        row.denoise_s = (row.denoise_s or 0.0) + video.denoise_s  # what every try cost
        row.decode_s = (row.decode_s or 0.0) + video.decode_s
        started = time.perf_counter()
        try:
            if isinstance(similarity, Exception):
                raise similarity
            with self.cpu.stage("score"):
                scores = score_clip(video.frames, np.asarray(request.image), similarity)
        except Exception as exc:
            fail(p, Stage.score, exc)
            return False
        row.score_s = (row.score_s or 0.0) + time.perf_counter() - started
        gates = row.params.quality
        if gates is None:
            self.writing.write(p, video, scores)
            return False
        p.tries.append(TryRecord(seed=request.seed, scores=scores, failed_gates=gates.failed(scores)))
        if not p.tries[-1].failed_gates:
            self.writing.write(p, video, scores, p.tries[-1])
            return False
        if p.best is None or len(p.tries[-1].failed_gates) < len(p.best[0].failed_gates):
            p.best = (p.tries[-1], video)
        if len(p.tries) < gates.max_tries:
            p.request = replace(request, seed=retry_seed(p.item.seed, len(p.tries)))
            return True
        best, video = p.best
        self.writing.write(p, video, best.scores, best, Status.rejected, upload=gates.keep_rejected)
        return False

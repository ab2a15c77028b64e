"""64-bit hashes of strings, vectorised: the ledger's done keys, the keys planning makes and the
survey's ids are millions of strings, and hashing them one Python call at a time takes seconds
per million.

pandas' `hash_array` (SipHash with a fixed key) is stable within one install, which is all
these need: every hash is compared only with hashes made in the same run, never stored."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pandas.util import hash_array

CHUNK = 1 << 20  # strings turned into Python objects at once: about 100 MB of them


def string_hashes(values: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(values, list):
        return _hashed(np.array(values, object))
    if not len(values):
        return np.zeros(0, np.uint64)
    return np.concatenate(
        [_hashed(values.slice(s, CHUNK).to_numpy(zero_copy_only=False)) for s in range(0, len(values), CHUNK)]
    )


def _hashed(values: np.ndarray) -> np.ndarray:
    try:
        return hash_array(values, categorize=False)
    except UnicodeEncodeError:  # a manifest id may hold a lone surrogate (a JSON escape), hashed all the same
        return hash_array(np.array([v.encode("utf-8", "surrogatepass") for v in values], object), categorize=False)

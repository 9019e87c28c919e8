"""How far apart the nodes' models are: pure functions over parameter dictionaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def flatten(params: Mapping[str, np.ndarray]) -> np.ndarray:
    """All parameters as one float64 vector, in name order."""
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in sorted(params)])


def network_mean(vectors: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(vectors), axis=0)


def consensus_distance(vectors: Sequence[np.ndarray]) -> float:
    """Root mean squared L2 distance of the nodes' parameter vectors from their mean:
    sqrt(1/N * sum_i ||x_i - mean||^2). Zero exactly when all nodes agree."""
    stacked = np.stack(vectors)
    return float(np.sqrt(np.mean(np.sum((stacked - stacked.mean(axis=0)) ** 2, axis=1))))


SAMPLE_VALUES = 1 << 18  # relative_distance reads at most about this many values per model


def relative_distance(mine: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> float | None:
    """||mine - theirs|| / ||mine|| over the floating-point arrays both name (None when ``mine`` is all
    zeros or nothing is comparable). Exact up to SAMPLE_VALUES values; above, estimated on every k-th value
    of each array (one strided pass, no model-sized temporaries), which a dashboard's trend needs, not more."""
    pairs = [
        (np.asarray(mine[k]).reshape(-1), np.asarray(theirs[k]).reshape(-1))
        for k in sorted(mine)
        if k in theirs
        and np.asarray(mine[k]).dtype.kind == "f"
        and np.asarray(theirs[k]).dtype.kind == "f"
        and np.asarray(mine[k]).size == np.asarray(theirs[k]).size
    ]
    total = sum(a.size for a, _ in pairs)
    if total == 0:
        return None
    step = max(1, -(-total // SAMPLE_VALUES))
    diff = norm = 0.0
    for a, b in pairs:
        a64, b64 = a[::step].astype(np.float64), b[::step].astype(np.float64)
        diff += float(np.dot(a64 - b64, a64 - b64))
        norm += float(np.dot(a64, a64))
    if norm == 0.0 or not np.isfinite(diff):
        return None
    return float(np.sqrt(diff / norm))

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

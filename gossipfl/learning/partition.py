"""Partitioning the training data among nodes: pure, deterministic functions of a seed."""

from __future__ import annotations

import numpy as np


def iid_partition(n_samples: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    """Shuffle 0..n_samples-1 with ``seed`` and cut it into ``num_nodes`` near-equal shards.

    Every index lands in exactly one shard; shard sizes differ by at most one."""
    if num_nodes < 1:
        raise ValueError("num_nodes must be >= 1")
    if n_samples < num_nodes:
        raise ValueError(f"{n_samples} samples cannot give each of {num_nodes} nodes at least one")
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(s) for s in np.array_split(order, num_nodes)]

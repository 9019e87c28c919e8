"""Partitioning the training data among nodes: pure, deterministic functions of a seed."""

from __future__ import annotations

import numpy as np


def iid_partition(labels: np.ndarray, num_nodes: int, seed: int) -> list[np.ndarray]:
    """Stratified IID split of sample indices into ``num_nodes`` shards.

    Each class's samples are shuffled with ``seed`` and dealt round-robin, continuing the count across
    classes, so every index lands in exactly one shard, shard sizes differ by at most one, and each
    class's count differs by at most one between shards."""
    labels = np.asarray(labels)
    n = len(labels)
    if num_nodes < 1:
        raise ValueError("num_nodes must be >= 1")
    if n < num_nodes:
        raise ValueError(f"{n} samples cannot give each of {num_nodes} nodes at least one")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    owner = np.arange(n) % num_nodes
    return [np.sort(order[owner == k]) for k in range(num_nodes)]

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


MAX_DRAWS = 100
SCHEMES = "iid, dirichlet:ALPHA or shards:S"


def dirichlet_partition(
    labels: np.ndarray, num_nodes: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed non-IID split (Hsu et al. 2019): each class's shuffled indices are cut among the nodes in
    proportions drawn from Dirichlet(alpha * ones(num_nodes)). Every index lands in exactly one shard and every
    shard holds at least ``min_size`` samples; the draw is repeated (from the same seeded generator) up to
    ``MAX_DRAWS`` times, then ``ValueError`` is raised. Smaller alpha means more skew."""
    labels = np.asarray(labels)
    n = len(labels)
    if num_nodes < 1:
        raise ValueError("num_nodes must be >= 1")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a positive number, got {alpha}")
    if n < num_nodes * min_size:
        raise ValueError(f"{n} samples cannot give each of {num_nodes} nodes at least {min_size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_nodes, alpha))) * len(idx)).astype(int)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        shards = [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.intp) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"dirichlet:{alpha:g} over {num_nodes} nodes left a node with fewer than {min_size} samples "
        f"after {MAX_DRAWS} draws; raise ALPHA or use fewer nodes"
    )


def shards_partition(labels: np.ndarray, num_nodes: int, shards_per_node: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): indices sorted by label (ties in seeded random order)
    are cut into ``num_nodes * shards_per_node`` contiguous shards whose sizes differ by at most one, and each
    node gets ``shards_per_node`` of them at random. Every index lands in exactly one node's shard."""
    labels = np.asarray(labels)
    n, total = len(labels), num_nodes * shards_per_node
    if num_nodes < 1 or shards_per_node < 1:
        raise ValueError("num_nodes and shards_per_node must be >= 1")
    if n < total:
        raise ValueError(f"{n} samples cannot be cut into {num_nodes} nodes x {shards_per_node} shards = {total}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    pieces = np.array_split(perm[np.argsort(labels[perm], kind="stable")], total)
    deal = rng.permutation(total).reshape(num_nodes, shards_per_node)
    return [np.sort(np.concatenate([pieces[j] for j in row])) for row in deal]


def parse_scheme(scheme: str) -> tuple[str, float | int | None]:
    """Validates a partition scheme string: ``iid`` -> ("iid", None), ``dirichlet:ALPHA`` -> ("dirichlet", ALPHA)
    with ALPHA a positive finite float, ``shards:S`` -> ("shards", S) with S a positive int."""
    name, sep, arg = scheme.strip().partition(":")

    def bad(problem: str) -> ValueError:
        return ValueError(f"partition scheme {scheme!r}: {problem} (expected {SCHEMES})")

    if name == "iid":
        if sep:
            raise bad("iid takes no parameter")
        return "iid", None
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise bad("ALPHA must be a positive number") from None
        if not (np.isfinite(alpha) and alpha > 0):
            raise bad("ALPHA must be a positive number")
        return "dirichlet", alpha
    if name == "shards":
        try:
            s = int(arg)
        except ValueError:
            raise bad("S must be a positive integer") from None
        if s < 1:
            raise bad("S must be a positive integer")
        return "shards", s
    raise bad("unknown scheme")


def partition(labels: np.ndarray, num_nodes: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Splits sample indices into ``num_nodes`` shards by a scheme string (see ``parse_scheme``); every index
    lands in exactly one shard, and the result depends only on the arguments."""
    name, arg = parse_scheme(scheme)
    if name == "dirichlet":
        return dirichlet_partition(labels, num_nodes, float(arg), seed)
    if name == "shards":
        return shards_partition(labels, num_nodes, int(arg), seed)
    return iid_partition(labels, num_nodes, seed)


def class_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """Per-class sample counts of ``labels[indices]``, length ``num_classes``; labels must lie in [0, num_classes)."""
    hist = np.bincount(np.asarray(labels)[np.asarray(indices, dtype=np.intp)], minlength=num_classes)
    if len(hist) > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return hist.tolist()


def label_skew(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> float:
    """Mean over non-empty shards of the total-variation distance (in [0, 1]) between the shard's class
    distribution and that of all ``labels``: 0 for a perfectly stratified split, near 1 for single-class shards."""
    glob = np.array(class_histogram(labels, np.arange(len(labels)), num_classes)) / len(labels)
    tvs = [
        0.5 * np.abs(np.array(class_histogram(labels, s, num_classes)) / len(s) - glob).sum() for s in shards if len(s)
    ]
    return float(np.mean(tvs)) if tvs else 0.0

"""The seeded train/test split every node computes the same way: scikit-learn's ``train_test_split``
(stratified when every class has two samples, else a plain shuffle), reimplemented on numpy so that a
node needs no scikit-learn. It gives the same indices for the same labels and seed, bit for bit
(``tests/test_tasks.py`` compares the two), so results measured before stay reproducible."""

from __future__ import annotations

import math

import numpy as np


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``n_draws`` to take from each class: the floor of its share, then one more for the
    largest remainders, ties broken at random (as ``sklearn.utils.extmath._approximate_mode``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``y``: ``ceil(test_fraction * n)`` test samples, stratified by class
    when every class has at least two samples. ValueError when a side would be empty, or a stratified
    side could not hold every class."""
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"{n} samples cannot be split {1 - test_fraction:g}/{test_fraction:g} into train and test")
    rng = np.random.RandomState(seed)
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:  # a class with one sample cannot be on both sides: plain shuffle
        permutation = rng.permutation(n)
        return permutation[n_test:], permutation[:n_test]
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(
            f"{n} samples of {len(classes)} classes: too few for a stratified {1 - test_fraction:g}/"
            f"{test_fraction:g} split with every class on both sides"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        permuted = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(permuted[: n_i[i]])
        test.extend(permuted[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)

"""Merge rules: pure functions over parameter dictionaries.

Push-pull averaging (Jelasity, Montresor & Babaoglu 2005): both partners end with (a + b) / 2, so the
sum of all nodes' parameters, hence the network mean, is conserved by every exchange.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Params = Mapping[str, np.ndarray]


def average(a: Params, b: Params) -> dict[str, np.ndarray]:
    """Elementwise mean. Invariant: average(a, b) * 2 == a + b (up to rounding), and it is symmetric
    bit for bit, so both partners of an exchange hold identical parameters afterwards."""
    return {name: ((a[name] + b[name]) * 0.5).astype(a[name].dtype, copy=False) for name in a}


def rebase(current: Params, sent: Params, merged: Params) -> dict[str, np.ndarray]:
    """Apply a merge computed from ``sent`` to ``current``, keeping local progress made in between:
    current + (merged - sent). Equal to ``merged`` when current == sent."""
    return {
        name: (current[name] + (merged[name] - sent[name])).astype(current[name].dtype, copy=False) for name in current
    }


def merged_age(a: int, b: int) -> int:
    """Age of a merged model: the older partner's (gossip learning convention)."""
    return max(a, b)

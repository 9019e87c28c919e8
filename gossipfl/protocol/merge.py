"""Merge rules: pure functions of the two partners of an exchange.

Every rule is symmetric, bit for bit: ``rule(a, b) == rule(b, a)``, so both partners of a push-pull
exchange end with identical parameters. Each rule is a weighted mean of the two models; they differ
in the weights, and so in what the network conserves:

| rule      | weights                      | invariant of every exchange                          |
|-----------|------------------------------|------------------------------------------------------|
| average   | 1, 1                         | sum of parameters (so the network mean)              |
| age       | model ages                   | result is a convex combination; age = the older one  |
| samples   | local training-set sizes n   | sum of n_i * x_i (so the data-weighted mean)         |
| pushsum   | push-sum weights w, averaged | sum of w_i and sum of w_i * x_i (Kempe et al. 2003)  |

``age`` is gossip learning's age-weighted merge (Ormandi, Hegedus & Jelasity 2013): a model that
embodies more updates counts more. ``pushsum`` is push-sum in push-pull form: each partner keeps half
of its mass (w, w*x) and receives half of the other's, so the weights travel with the models.
Every rule also averages the push-sum weight, so the sum of weights is conserved whatever the rule.

Ages are claims a peer makes, so no exchange may let one of them run away: a merged age is at most
``MAX_AGE_GAIN`` steps above the younger partner's (both partners compute the same capped ages, so the
``age`` rule stays symmetric), and a node keeps its own age when that is higher. One message claiming
age 2**53 thus adds at most 10,000 steps to the node it reaches, not 2**53 to the whole network.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

Params = Mapping[str, np.ndarray]
MAX_AGE_GAIN = 10_000  # most steps one exchange can add to the younger partner's age


@dataclass(frozen=True)
class Side:
    """One partner's model as a merge rule sees it."""

    params: Params
    age: int  # local updates the model embodies
    samples: int  # size of the partner's local training set
    weight: float  # push-sum weight


@dataclass(frozen=True)
class Merged:
    params: dict[str, np.ndarray]
    age: int
    weight: float
    distance: float | None = None  # how far apart the two models were (consensus.relative_distance)


def weighted_mean(
    a: Params, b: Params, wa: float, wb: float, into: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """(wa*a + wb*b) / (wa + wb), keeping each array's dtype. The weights are normalised first, so
    neither huge weights nor huge values overflow, and the result is symmetric bit for bit (IEEE
    addition and multiplication commute). Equal weights give a/2 + b/2. ``into``: arrays (of a's dtype
    and shape; they may be b's) to write the result in, for the tensors it names, instead of new ones."""
    if wa <= 0 and wb <= 0:
        wa = wb = 1.0
    pa, pb = (0.5, 0.5) if wa == wb else (wa / (wa + wb), wb / (wa + wb))
    out = {}
    for name in a:
        target = (into or {}).get(name)
        if target is not None and target.dtype == a[name].dtype and target.shape == np.shape(a[name]):
            out[name] = _mean_into(target, a[name], b[name], pa, pb)
        else:
            out[name] = (a[name] * pa + b[name] * pb).astype(a[name].dtype, copy=False)
    return out


BLOCK = 1 << 16  # values per block of an in-place mean (a scratch of this size stays in cache)


def _mean_into(target: np.ndarray, a: np.ndarray, b: np.ndarray, pa: float, pb: float) -> np.ndarray:
    """a*pa + b*pb written into ``target`` (which may be b) block by block, with the same roundings as the
    expression: no temporary array of the tensor's size (no fresh pages to fault in), one small scratch."""
    t, x, y = target.reshape(-1), np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    scratch = np.empty(min(BLOCK, t.size), t.dtype)
    for start in range(0, t.size, BLOCK):
        part = slice(start, start + BLOCK)
        s = scratch[: len(t[part])]
        np.multiply(x[part], pa, out=s, casting="same_kind")
        np.multiply(y[part], pb, out=t[part], casting="same_kind")
        t[part] += s
    return target


def capped_ages(a: int, b: int) -> tuple[int, int]:
    """Both ages, each cut to at most MAX_AGE_GAIN above the younger one (symmetric in a and b)."""
    ceiling = min(a, b) + MAX_AGE_GAIN
    return min(a, ceiling), min(b, ceiling)


def _merged(a: Side, b: Side, wa: float, wb: float, into: Mapping[str, np.ndarray] | None) -> Merged:
    age = max(capped_ages(a.age, b.age))
    return Merged(weighted_mean(a.params, b.params, wa, wb, into), age, (a.weight + b.weight) * 0.5)


# Each rule takes ``into``: arrays to write the merged tensors in (see weighted_mean); the result is the same.
def average(a: Side, b: Side, *, into: Mapping[str, np.ndarray] | None = None) -> Merged:
    return _merged(a, b, 1.0, 1.0, into)


def age_weighted(a: Side, b: Side, *, into: Mapping[str, np.ndarray] | None = None) -> Merged:
    age_a, age_b = capped_ages(a.age, b.age)
    return _merged(a, b, float(age_a), float(age_b), into)


def sample_weighted(a: Side, b: Side, *, into: Mapping[str, np.ndarray] | None = None) -> Merged:
    return _merged(a, b, float(a.samples), float(b.samples), into)


def push_sum(a: Side, b: Side, *, into: Mapping[str, np.ndarray] | None = None) -> Merged:
    return _merged(a, b, a.weight, b.weight, into)


Rule = Callable[..., Merged]  # (a: Side, b: Side, *, into=None) -> Merged
RULES: dict[str, Rule] = {
    "average": average,
    "age": age_weighted,
    "samples": sample_weighted,
    "pushsum": push_sum,
}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown merge rule {name!r} (known: {', '.join(RULES)})") from None


def apply(current: Params, sent: Params, merged: Params, *, changed: bool) -> dict[str, np.ndarray]:
    """The parameters a node sets after an exchange whose merge it computed from ``sent``: exactly
    ``merged`` when nothing changed its model meanwhile, else ``rebase`` (the local steps, or in rare
    cases another merge, made since ``sent`` are kept and nothing is counted twice)."""
    return rebase(current, sent, merged) if changed else dict(merged)


def apply_weight(current: float, sent: float, merged: float) -> float:
    """The push-sum weight after an exchange: ``merged``, plus any change since ``sent`` (the sum of all
    weights is conserved even when two merges overlap)."""
    return merged if current == sent else current + (merged - sent)


def keep_nonnegative(result: Params, current: Params, sent: Params, merged: Params) -> dict[str, np.ndarray]:
    """For a merge applied late, on top of other merges: a tensor that was non-negative everywhere in the
    current, sent and merged states (a BatchNorm variance) stays non-negative. Only a merge applied late
    can need this, and then the clamp is the one place where a sum is not conserved."""
    out = dict(result)
    for name, value in result.items():
        if all(np.min(p[name], initial=0.0) >= 0 for p in (current, sent, merged)):
            out[name] = np.maximum(value, 0).astype(value.dtype, copy=False)
    return out


def keep_convex(result: Params, current: Params, merged: Params, names: Collection[str]) -> dict[str, np.ndarray]:
    """For a merge applied late: the tensors in ``names`` (statistics such as the moments of a
    Standardize layer, which must stay a convex combination of the nodes' own, or a variance taken from
    them can go negative) become the mean of the current and the merged values, both convex, instead of
    current + (merged - sent), which is not. Like the clamps, this gives up conservation for them."""
    out = dict(result)
    for name in names:
        if name in out:
            mean = (np.asarray(current[name], np.float64) + np.asarray(merged[name], np.float64)) / 2
            out[name] = mean.astype(out[name].dtype)
    return out


def keep_positive_weight(weight: float, current: float, merged: float) -> float:
    """For a merge applied late: the push-sum weight must stay positive (a node with a weight of 0 or
    less could send nothing); never less than half the smaller of its current and merged weights."""
    return max(weight, 0.5 * min(current, merged))


def rebase_into(current: Params, sent: Params, merged: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``rebase``, written into the arrays of ``merged`` (which it overwrites) instead of new ones: the same
    two roundings, (merged - sent) then + current."""
    out = {}
    for name in current:
        m = merged[name]
        if isinstance(m, np.ndarray) and m.flags.writeable and m.dtype == current[name].dtype:
            np.subtract(m, sent[name], out=m, casting="same_kind")
            m += current[name]
            out[name] = m
        else:
            out[name] = (current[name] + (m - sent[name])).astype(current[name].dtype, copy=False)
    return out


def rebase(current: Params, sent: Params, merged: Params) -> dict[str, np.ndarray]:
    """Apply a merge computed from ``sent`` to ``current``, keeping local progress made in between:
    current + (merged - sent). Equal to ``merged`` when current == sent."""
    return {
        name: (current[name] + (merged[name] - sent[name])).astype(current[name].dtype, copy=False) for name in current
    }

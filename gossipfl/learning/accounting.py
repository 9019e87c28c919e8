"""The privacy accountant of DP-SGD: the epsilon spent by a history of Poisson-subsampled Gaussian steps,
computed by Opacus' own analysis (RDP or PRV), and how many more steps a budget allows.

The history is Opacus' own format: runs of ``(noise_multiplier, sample_rate, steps)``, consecutive steps
with the same pair merged into one run, so a node that never changes its settings has one entry. What it
costs (docs/privacy.md has the measurements): under RDP, the curve of one step is computed once per
(sigma, q) (tens of milliseconds) and the epsilon of T steps is that curve times T, converted at the
best order (microseconds), whatever T; this is exactly what Opacus' ``RDPAccountant.get_epsilon`` does
(``compute_rdp(steps=T)`` is the one-step curve times T). PRV composes the steps numerically: a tighter
epsilon, at a cost that grows with T (and with epsilon): seconds, and hundreds of megabytes, for 10^5
steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

Run = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
HORIZON = 2**20  # the most steps one search for the budget's limit looks ahead (it is searched again after)
PRV_MEMO = 32
# PRV composes the steps numerically: its cost grows with the steps and the epsilon (measured, Opacus 1.5:
# 10^3 steps 1.5 s / 0.5 GB, 3*10^3 7.7 s / 2.2 GB at epsilon ~100); past this many steps, rdp only
PRV_MAX_STEPS = 10_000
PRV_REFINE = 6  # PRV evaluations that refine RDP's limit (each up to seconds): the limit found stays a valid one
# Opacus' warning that the best RDP order is the smallest (a large epsilon) or the largest (a tiny one) of its
# defaults: the bound could be a little tighter with other orders; it stays a valid bound, Opacus' own
warnings.filterwarnings("ignore", message="Optimal order is the")


def noise_for(target_epsilon: float, delta: float, q: float, steps: int, mechanism: str) -> float:
    """The noise multiplier with which ``steps`` steps at sample rate q spend at most ``target_epsilon``
    (Opacus' ``get_noise_multiplier``, to 0.01 in epsilon). ValueError when none up to 1e6 does. PRV: not
    Opacus' search, whose evaluations at small noise (huge epsilons) take minutes and gigabytes: RDP's
    noise multiplier (PRV's epsilon is tighter: it reaches the target too), lowered by a bisection down to
    3/4 of it with PRV_REFINE PRV evaluations, each near the target."""
    sigma = float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"
        )
    )
    if mechanism == "rdp":
        return sigma
    lo, hi = 0.75 * sigma, sigma
    for _ in range(PRV_REFINE):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if Accountant("prv", delta, [(mid, q, steps)]).epsilon() <= target_epsilon else (mid, hi)
    return hi


def parse_history(value: object) -> list[Run]:
    """A history from a checkpoint's JSON (ValueError, one line, when it is not one)."""
    if not isinstance(value, list):
        raise ValueError("privacy history is not a list")
    runs: list[Run] = []
    for item in value:
        if not (isinstance(item, list | tuple) and len(item) == 3):
            raise ValueError(f"privacy history entry {item!r} is not [noise_multiplier, sample_rate, steps]")
        sigma, q, steps = item
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 2**53:
            raise ValueError(f"privacy history entry {item!r}: steps must be an integer from 0 to 2**53")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (sigma, q)):
            raise ValueError(f"privacy history entry {item!r}: noise multiplier and sample rate must be numbers")
        if not (0 <= sigma < float("inf") and 0 < q <= 1):
            raise ValueError(f"privacy history entry {item!r}: needs noise multiplier >= 0 and 0 < sample rate <= 1")
        runs.append((float(sigma), float(q), steps))
    return runs


class Accountant:
    """Epsilon of a history of DP-SGD steps at a fixed delta, under ``mechanism`` (``rdp`` or ``prv``)."""

    def __init__(self, mechanism: str, delta: float, history: Iterable[Run] = ()) -> None:
        if mechanism not in ("rdp", "prv"):
            raise ValueError(f"accountant {mechanism!r}: expected rdp or prv")
        self.mechanism = mechanism
        self.delta = delta
        self.history: list[Run] = [tuple(r) for r in history]  # type: ignore[misc]
        self._curves: dict[tuple[float, float], np.ndarray] = {}  # (sigma, q) -> RDP of one step, per order
        self._prv: dict[tuple[Run, ...], float] = {}  # history -> PRV epsilon (the last few)

    @property
    def steps(self) -> int:
        return sum(run[2] for run in self.history)

    def step(self, sigma: float, q: float, steps: int = 1) -> None:
        """Count ``steps`` more steps at (sigma, q), merged into the last run when it has the same pair (as
        Opacus' accountants do)."""
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    def epsilon(self, more: Run | None = None) -> float:
        """Epsilon of the history, followed by the run ``more`` if given (0 for no steps)."""
        runs = [r for r in [*self.history, *([more] if more else [])] if r[2] > 0]
        if not runs:
            return 0.0
        if self.mechanism == "rdp":
            rdp = sum(self._curve(sigma, q) * steps for sigma, q, steps in runs)
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
            return float(eps)
        key = tuple(runs)
        if key not in self._prv:
            accountant = PRVAccountant()
            accountant.history = list(runs)
            if len(self._prv) >= PRV_MEMO:
                self._prv.pop(next(iter(self._prv)))
            self._prv[key] = float(accountant.get_epsilon(delta=self.delta))
        return self._prv[key]

    def _curve(self, sigma: float, q: float) -> np.ndarray:
        if (sigma, q) not in self._curves:
            self._curves[(sigma, q)] = np.asarray(
                rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
            )
        return self._curves[(sigma, q)]

    def rdp_affordable(self, sigma: float, q: float, budget: float, horizon: int = HORIZON) -> int:
        """``affordable`` under RDP (microseconds per evaluation), whatever this accountant's mechanism."""
        rdp = self if self.mechanism == "rdp" else Accountant("rdp", self.delta, self.history)
        return _search(lambda k: rdp.epsilon((sigma, q, k)) <= budget, horizon)

    def affordable(self, sigma: float, q: float, budget: float, horizon: int = HORIZON) -> int:
        """The most steps k <= ``horizon`` at (sigma, q) after the history with epsilon <= ``budget`` (0 if
        not even one); every k returned is checked under this accountant's mechanism. RDP: doubling, then
        bisection. PRV (seconds per evaluation): RDP's limit, which PRV's tighter epsilon allows (checked),
        refined upwards with at most PRV_REFINE evaluations, and never past PRV_MAX_STEPS steps in all."""
        lo = self.rdp_affordable(sigma, q, budget, horizon)
        if self.mechanism == "rdp":
            return lo
        fits = lambda k: self.epsilon((sigma, q, k)) <= budget  # noqa: E731
        room = max(0, PRV_MAX_STEPS - self.steps)
        lo = min(lo, room)
        if lo > 0 and not fits(lo):  # (PRV above RDP: not expected) a full search below RDP's limit
            return _search(fits, lo)
        good, bad = lo, min(room, max(2 * lo, 1)) + 1  # fits(good); bad: not known to fit
        for _ in range(PRV_REFINE):
            if bad - good <= 1:
                break
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return good


def _search(fits: Callable[[int], bool], horizon: int) -> int:
    """The largest k <= ``horizon`` with ``fits(k)`` (fits grows false with k; 0 if not even 1): doubling,
    then bisection (about 2 log2 k evaluations)."""
    if horizon < 1 or not fits(1):
        return 0
    good, bad = 1, 2
    while bad <= horizon and fits(bad):
        good, bad = bad, bad * 2
    if bad > horizon:
        if fits(horizon):
            return horizon
        bad = horizon
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good

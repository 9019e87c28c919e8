"""Merging that a poisoner cannot steer far: self-centred clipping (He, Karimireddy & Jaggi 2022,
"Byzantine-robust decentralized learning via ClippedGossip").

Before the merge rule sees a peer's model, the peer's difference from this node's own model is clipped to
norm ``tau``: ``x_peer' = x_own + clip(x_peer - x_own, tau)``. One exchange with a member that sends
anything (parameters times 100, flipped, noise) then moves this node by at most ``tau / 2`` (the
``average`` rule). ``tau`` is fixed (``--clip-radius TAU``) or adaptive (``--clip-radius auto``): the
``quantile`` (``--clip-quantile``, default the median) of the latest distance to each of the other last
``HISTORY`` partners. It follows the honest distances as the network converges, and
partners that send far models cannot raise it unless they are more than ``1 - quantile`` of the partners
(each counts once: with a cluster key alone a member can claim many ids; mutual TLS binds them): the
paper's adaptive rule clips the share of partners assumed Byzantine. A model farther than
``refuse_factor`` times the median (``--refuse-factor``) is refused outright.

Each side clips what it receives toward itself, so when clipping happens the two partners no longer end
with the same model, and the pair no longer conserves the sum of its parameters: it does exactly when
their distance is within both radii; otherwise the network mean moves by at most ``(tau_i + tau_j) / 2n``
per exchange (see SECURITY.md). Pure but for the history, which the caller owns (one per node)."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gossipfl.protocol.wire import WireError

Params = Mapping[str, np.ndarray]
HISTORY = 64  # partners whose latest distance sets the adaptive radius and the refusal threshold
MIN_HISTORY = 8  # no refusal before this many other partners were seen
REFUSE_FACTOR = 20.0


class TooFar(WireError):
    """The peer's model is implausibly far from this node's: HTTP 400, nothing merged."""


def _floats(params: Params) -> list[str]:
    return [k for k in sorted(params) if np.asarray(params[k]).dtype.kind == "f"]


def distance(mine: Params, theirs: Params) -> float:
    """L2 distance between two models over their floating-point tensors (counters are left out)."""
    total = 0.0
    for k in _floats(mine):
        d = np.asarray(theirs[k], dtype=np.float64) - np.asarray(mine[k], dtype=np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def norm(params: Params) -> float:
    """L2 norm of a model over its floating-point tensors (``distance`` from zero, without making a zero
    model to measure it)."""
    total = 0.0
    for k in _floats(params):
        v = np.asarray(params[k], dtype=np.float64).ravel()
        total += float(np.dot(v, v))
    return math.sqrt(total)


def clip_toward(mine: Params, theirs: Params, tau: float, dist: float | None = None) -> dict[str, np.ndarray]:
    """``theirs`` moved toward ``mine`` so that their distance is at most ``tau`` (unchanged when it is)."""
    d = distance(mine, theirs) if dist is None else dist
    if d <= tau:
        return dict(theirs)
    scale = tau / d
    out = dict(theirs)
    for k in _floats(mine):
        a = np.asarray(mine[k])
        out[k] = (a + (np.asarray(theirs[k], dtype=np.float64) - a) * scale).astype(a.dtype, copy=False)
    return out


def parse_radius(text: str | None) -> float | str | None:
    """None (off), "auto", or a positive float, from ``--clip-radius``; ValueError otherwise."""
    if text is None or text in ("", "off", "none"):
        return None
    if text == "auto":
        return "auto"
    try:
        tau = float(text)
    except ValueError:
        raise ValueError(f"clip-radius {text!r}: expected auto, off or a positive number") from None
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"clip-radius {text!r}: must be > 0")
    return tau


@dataclass(frozen=True)
class Clipped:
    params: dict[str, np.ndarray]
    distance: float
    tau: float

    @property
    def clipped(self) -> bool:
        return self.distance > self.tau


class RobustMerge:
    """One node's clipping: its radius setting and the latest distance to each recent partner (thread-safe:
    merges are computed in worker threads). Each partner counts once, however many models it sends, so a
    partner cannot drag the adaptive radius with a stream of far models, whether they are merged, refused,
    or prepared and then aborted."""

    def __init__(
        self, radius: float | str, refuse_factor: float = REFUSE_FACTOR, quantile: float = 0.5, history: int = HISTORY
    ) -> None:
        self.radius = radius
        self.refuse_factor = refuse_factor
        self.quantile = quantile
        self.history = history
        self._latest: dict[str, float] = {}  # partner -> its latest distance, most recent partner last
        self._lock = threading.Lock()
        self.last_tau: float | None = None
        self.clipped = 0  # models received that were clipped
        self.refused = 0  # models received that were refused as too far

    def reference(self) -> float | None:
        """The median of the partners' latest distances (None before any)."""
        with self._lock:
            return float(np.median(list(self._latest.values()))) if self._latest else None

    def apply(self, mine: Params, theirs: Params, sender: str = "") -> Clipped:
        """The model of partner ``sender`` clipped toward this node's; TooFar when it is implausibly far.
        The radius and the refusal threshold come from the *other* partners' latest distances only, so a
        partner cannot widen its own radius, and from the lower of two middle values, so that among few
        partners one far one does not set the radius. While a node has had one partner only, that partner's
        previous distance is the radius: its first model moves this node not at all (there is nothing to
        compare it with), and a lone partner can widen the radius step by step (robust merging needs
        several partners). Nothing is refused before MIN_HISTORY other partners are known."""
        d = distance(mine, theirs)
        if not math.isfinite(d):
            raise TooFar("the model's distance from this node's is not finite")
        with self._lock:
            others = [v for k, v in self._latest.items() if k != sender]
            previous = self._latest.pop(sender, None)
            self._latest[sender] = d
            while len(self._latest) > self.history:
                del self._latest[next(iter(self._latest))]
        # a floor, so that a network whose models coincide (pure averaging, converged) refuses nothing
        floor = 1e-6 * max(norm(mine), 1e-12)
        median = float(np.quantile(others, 0.5, method="lower")) if others else 0.0
        if self.refuse_factor > 0 and len(others) >= MIN_HISTORY and d > self.refuse_factor * max(median, floor):
            with self._lock:
                self.refused += 1
            raise TooFar(
                f"model implausibly far: distance {d:.4g} > {self.refuse_factor:g} x the recent median {median:.4g}"
            )
        if self.radius != "auto":
            tau = float(self.radius)
        elif others:
            tau = max(float(np.quantile(others, self.quantile, method="lower")), floor)
        else:  # the only partner so far: its previous distance (none the first time: this node stays put)
            tau = previous if previous is not None else 0.0
        out = Clipped(clip_toward(mine, theirs, tau, d), d, tau)
        with self._lock:
            self.last_tau = out.tau
            self.clipped += out.clipped
        return out

    def export(self) -> dict[str, object]:
        """What a checkpoint keeps: the partners' latest distances (oldest first) and the counters."""
        with self._lock:
            return {"latest": dict(self._latest), "clipped": self.clipped, "refused": self.refused}

    def restore(self, saved: dict[str, object]) -> None:
        """Take back what ``export`` gave (ValueError, changing nothing, if it is not that shape)."""
        latest = saved.get("latest", {})
        if not isinstance(latest, dict):
            raise ValueError("robust: 'latest' is not a map")
        distances = {str(k): float(v) for k, v in latest.items()}  # type: ignore[arg-type]
        if not all(math.isfinite(d) and d >= 0 for d in distances.values()):
            raise ValueError("robust: a distance is not a finite non-negative number")
        clipped, refused = int(saved.get("clipped", 0)), int(saved.get("refused", 0))  # type: ignore[arg-type]
        with self._lock:
            self._latest = dict(list(distances.items())[-self.history :])
            self.clipped, self.refused = clipped, refused

    def describe(self) -> dict[str, object]:
        return {
            "clip_radius": self.radius,
            "clip_quantile": self.quantile if self.radius == "auto" else None,
            "tau": self.last_tau,
            "recent_median_distance": self.reference(),
            "partners": len(self._latest),
            "refuse_factor": self.refuse_factor,
            "clipped": self.clipped,
            "refused_too_far": self.refused,
        }

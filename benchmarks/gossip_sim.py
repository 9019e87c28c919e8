"""Event simulation of asynchronous push-pull averaging, to put the theoretical convergence rate of the
gossip protocol next to what the node daemon measures. Pure numpy, no gossipfl import.

Protocol simulated (time is measured in gossip intervals):

* N nodes; node i holds a vector x_i of ``dim`` independent coordinates, initially i.i.d. N(0, 1).
* Every node runs its own timer. Its first wake-up is drawn from U(0, 1 + jitter); after each wake-up the
  next one is ``delay ~ U(1 - jitter, 1 + jitter)`` later, drawn afresh every time (jitter = 0.2: +-20%).
* On wake-up a node picks a peer uniformly at random among the N - 1 OTHER nodes and does a push-pull
  exchange: both set their vector to (x_i + x_j) / 2. The exchange is atomic. With ``duration`` d = 0
  (default) it is instantaneous. With d > 0 both participants are busy for d intervals and the averaged
  value is written to both at the end of the exchange; a node that wakes while busy skips that round,
  and an exchange whose chosen peer is busy is dropped (the initiator waits for its next round).
* ``--overlap abort`` models what the nodes do instead (protocol 2, see gossipfl/protocol/gossiper.py):
  exchanges are not refused up front; each takes d intervals, both sides snapshot at its start, and at
  its end it commits only if neither node merged anything since (else it is aborted: no change). A
  node starts at most ``MAX_OUTBOUND`` = 2 exchanges at once and never two with one peer. With d
  small against the interval, both models agree with d = 0; with d a noticeable share of the interval,
  aborted exchanges slow the averaging down (the busy/aborted path that short intervals exercise).
* ``loss`` p: an exchange fails with probability p, independently of every other, and changes neither
  node (a lost connection; the nodes' ``failed`` exchanges). With d > 0 it still takes its d intervals
  (and its outbound slot) before it fails. p = 0 draws nothing extra: the run is as without it.
* Statistic: V(t) = mean over coordinates of the across-node (population) variance, sampled at
  t = 0, 1, 2, ... intervals. The per-interval reduction factor is exp(slope) of a least-squares line
  fitted to log V(t) against t; see :func:`reduction_factor`.

Theory for large N (Jelasity, Montresor & Babaoglu 2005, push-pull averaging): 1 / (2 sqrt(e)) ~ 0.303;
with exchanges lost with probability p, (1 + p) / 2 * exp(-(1 - p) / 2) (``theory_with_loss``).

    .venv/bin/python benchmarks/gossip_sim.py [--nodes 8 16 32 64] [--runs 20] [--intervals 60] [--loss P]
"""

from __future__ import annotations

import argparse
import heapq
import math
import time

import numpy as np

_WAKE = 0  # event kinds; a wake-up sorts before a completion at an identical time (measure zero anyway)
_DONE = 1


MAX_OUTBOUND = 2  # as gossipfl.protocol.initiator: exchanges one node has started and not finished


def simulate_pushpull(
    n: int,
    intervals: int,
    seed: int,
    dim: int = 64,
    jitter: float = 0.2,
    duration: float = 0.0,
    overlap: str = "drop",
    counts: dict[str, int] | None = None,
    pace: float = 1.0,
    loss: float = 0.0,
) -> np.ndarray:
    """Simulate the asynchronous push-pull protocol described in the module docstring.

    Args:
        n: number of nodes (>= 2).
        intervals: simulate up to t = ``intervals`` gossip intervals.
        seed: seed of the numpy Generator; every random draw of the run comes from it.
        dim: number of independent coordinates per node (smooths the variance estimate).
        jitter: timer delays are U(1 - jitter, 1 + jitter); first wake-ups U(0, 1 + jitter).
        duration: exchange duration d in intervals (0: instantaneous). During it both nodes are busy.
        overlap: with d > 0, "drop" (a busy node skips or refuses exchanges) or "abort" (exchanges
            overlap and the later-ending one aborts if either node merged meanwhile; the nodes' protocol).
        counts: if given, incremented per exchange started: "started", "committed", "aborted" (overlap
            abort), "refused" (overlap drop: the initiator or its peer was busy) and "failed" (``loss``);
            exchanges still in flight at the end are started but neither committed nor aborted.
        pace: every timer delay is multiplied by this (>= 1): the nodes' pacing, which lengthens the
            interval when exchanges take over a quarter of it (gossipfl/protocol/initiator.py).
        loss: probability that an exchange fails (changes neither node; counted in "failed").

    Returns:
        Array of length ``intervals + 1``: V(t) for t = 0, 1, ..., intervals, where V is the mean over
        coordinates of the population variance across nodes. Events with time <= t are applied before
        V(t) is sampled; an exchange in progress at t has not yet written its result.
    """
    if n < 2:
        raise ValueError("need at least 2 nodes")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    if duration < 0.0:
        raise ValueError("duration must be >= 0")
    if overlap not in ("drop", "abort"):
        raise ValueError("overlap must be drop or abort")
    if not 0.0 <= loss <= 1.0:
        raise ValueError("loss must be in [0, 1]")
    tally = counts if counts is not None else {}
    for key in ("started", "committed", "aborted", "refused", "failed"):
        tally.setdefault(key, 0)
    merges = np.zeros(n, dtype=np.int64)  # merges applied per node (overlap abort)
    outbound: list[set[int]] = [set() for _ in range(n)]  # peers node i has an exchange with (it started)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    busy_until = np.zeros(n)
    # heap entries: (time, kind, node, peer, merges of node and of peer at the start); the rest is only
    # meaningful for completions
    events: list[tuple[float, int, int, int, int, int]] = [
        (float(t0), _WAKE, i, -1, 0, 0) for i, t0 in enumerate(rng.uniform(0.0, 1.0 + jitter, n))
    ]
    heapq.heapify(events)
    out = np.empty(intervals + 1)
    out[0] = x.var(axis=0).mean()
    for t in range(1, intervals + 1):
        while events and events[0][0] <= t:
            now, kind, i, j, mi, mj = heapq.heappop(events)
            if kind == _DONE:
                if overlap == "abort":
                    outbound[i].discard(j)
                if loss > 0.0 and rng.random() < loss:
                    tally["failed"] += 1
                    continue
                if overlap == "abort":
                    if merges[i] != mi or merges[j] != mj:  # either side merged since the snapshot
                        tally["aborted"] += 1
                        continue
                    merges[i] += 1
                    merges[j] += 1
                x[i] = x[j] = 0.5 * (x[i] + x[j])
                tally["committed"] += 1
                continue
            heapq.heappush(events, (now + pace * rng.uniform(1.0 - jitter, 1.0 + jitter), _WAKE, i, -1, 0, 0))
            j = int(rng.integers(n - 1))
            j += j >= i  # uniform over the other n - 1 nodes
            if duration == 0.0:
                tally["started"] += 1
                if loss > 0.0 and rng.random() < loss:
                    tally["failed"] += 1
                    continue
                tally["committed"] += 1
                x[i] = x[j] = 0.5 * (x[i] + x[j])
            elif overlap == "abort":
                if len(outbound[i]) >= MAX_OUTBOUND or j in outbound[i]:
                    continue  # no round (the node does not pick a peer it is already exchanging with)
                tally["started"] += 1
                outbound[i].add(j)
                heapq.heappush(events, (now + duration, _DONE, i, j, int(merges[i]), int(merges[j])))
            elif busy_until[i] <= now and busy_until[j] <= now:
                tally["started"] += 1
                busy_until[i] = busy_until[j] = now + duration
                heapq.heappush(events, (now + duration, _DONE, i, j, 0, 0))
            else:  # the initiator is busy (skips its round) or the peer is busy (exchange refused)
                tally["started"] += 1
                tally["refused"] += 1
        out[t] = x.var(axis=0).mean()
    return out


def reduction_factor(variances: np.ndarray, burn_in: int = 2, floor: float = 1e-20) -> float:
    """Per-interval variance reduction factor of a series V(0), V(1), ... sampled once per gossip interval.

    Fits a least-squares line to log V(t) against t over the window t >= ``burn_in`` that ends before the
    first t with V(t) <= ``floor`` * V(0) (where float64 rounding starts to dominate), and returns
    exp(slope). Works for simulated series and for variances measured on real nodes alike; whether the
    variance is the population or the sample variance does not change the slope.
    """
    v = np.asarray(variances, dtype=float)
    if v.ndim != 1 or v.size == 0 or not v[0] > 0:
        raise ValueError("need a 1-D series with V(0) > 0")
    below = np.flatnonzero(~(v > floor * v[0]))  # also stops at NaN
    end = int(below[0]) if below.size else v.size
    t = np.arange(burn_in, end)
    if t.size < 2:
        raise ValueError(f"fewer than 2 points in the fit window [{burn_in}, {end})")
    slope = np.polyfit(t, np.log(v[t]), 1)[0]
    return float(math.exp(slope))


def theory_large_n() -> float:
    """Large-N per-interval variance reduction factor of push-pull averaging: 1 / (2 sqrt(e)) ~ 0.3033."""
    return 1.0 / (2.0 * math.sqrt(math.e))


def theory_with_loss(p: float) -> float:
    """Large-N factor when each exchange fails with probability ``p`` and changes nothing. As for p = 0
    (each committed exchange halves a node's share of the variance): per interval a node's own exchange
    commits with probability 1 - p (on average a factor (1 + p) / 2) and it answers a Poisson(1 - p)
    number of committed exchanges from others (exp(-(1 - p) / 2)): (1 + p) / 2 * exp(-(1 - p) / 2)."""
    return (1.0 + p) / 2.0 * math.exp(-(1.0 - p) / 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--runs", type=int, default=20, help="independent runs (seeds 0..runs-1) per N")
    ap.add_argument("--intervals", type=int, default=60)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--jitter", type=float, default=0.2)
    ap.add_argument("--duration", type=float, default=0.0, help="exchange duration in intervals")
    ap.add_argument("--overlap", choices=("drop", "abort"), default="drop", help="see the module docstring")
    ap.add_argument("--loss", type=float, default=0.0, help="probability that an exchange fails")
    ap.add_argument("--burn-in", type=int, default=2)
    ap.add_argument("--floor", type=float, default=1e-20)
    args = ap.parse_args()
    start = time.perf_counter()
    theory = theory_with_loss(args.loss) if args.loss else theory_large_n()
    print(
        f"push-pull averaging, jitter +-{args.jitter:.0%}, exchange duration {args.duration:g} intervals "
        f"(overlap: {args.overlap}), exchanges lost: {args.loss:g}, "
        f"dim {args.dim}, fit t >= {args.burn_in} while V > {args.floor:g} V(0)\n"
    )
    print(
        "| N | simulated factor per interval (mean ± std) | runs | exchanges committed / aborted / refused / failed "
        "| theory, large N |\n|---|---|---|---|---|"
    )
    for n in args.nodes:
        counts: dict[str, int] = {}
        factors = [
            reduction_factor(
                simulate_pushpull(
                    n, args.intervals, seed, args.dim, args.jitter, args.duration, args.overlap, counts, loss=args.loss
                ),
                args.burn_in,
                args.floor,
            )
            for seed in range(args.runs)
        ]
        std = float(np.std(factors, ddof=1)) if len(factors) > 1 else 0.0
        ended = sum(counts[k] for k in ("committed", "aborted", "refused", "failed"))
        shares = " / ".join(f"{counts[k] / ended:.0%}" for k in ("committed", "aborted", "refused", "failed"))
        print(f"| {n} | {np.mean(factors):.3f} ± {std:.3f} | {args.runs} | {shares} | {theory:.3f} |")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

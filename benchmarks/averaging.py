"""Pure averaging (--no-train) with real nodes against the theory of push-pull gossip.

For N in {8, 16, 32}, runs the in-process testbed (real HTTP on loopback, real mDNS on 127.0.0.1, one
exchange started per node per gossip interval with +-20% jitter) and samples the nodes' models once
per gossip interval. The variance of the parameters across nodes, V(t), is proportional to the
squared consensus distance; the per-interval reduction factor is exp(slope) of log V(t) against t in
intervals (``gossip_sim.reduction_factor``, the same fit for measurement and simulation). Next to it:
the same statistic from simulating the protocol (``gossip_sim.simulate_pushpull``) and the large-N
theory for push-pull averaging, 1/(2 sqrt(e)) ~ 0.303 (Jelasity, Montresor & Babaoglu 2005).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/averaging.py [--nodes 8 16 32] [--runs 3] [--gossip-interval 0.5] [--name averaging]

The simulation is given the exchanges' measured mean duration, as a share d of the interval, and the
nodes' rule for overlapping exchanges (the later one aborts if either side merged meanwhile): at 1 s an
exchange takes well under 1% of the interval and nothing overlaps; at a short interval (e.g.
``--gossip-interval 0.05 --name averaging-short``) exchanges take a noticeable share of it, some are
declined (409) or aborted, and the table compares that share and the slower averaging with the
simulation's. Writes benchmarks/results/NAME.md and NAME.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gossip_sim import reduction_factor, simulate_pushpull, theory_large_n  # noqa: E402

from gossipfl.testbed import TestbedOptions, run_testbed  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# models are float32: stop the fit while the spread is still well above float32 rounding of the mean
FLOOR = 1e-10


def measure(n: int, run: int, interval: float, duration: float, out: Path) -> tuple[np.ndarray, dict[str, float]]:
    opts = TestbedOptions(
        nodes=n, duration=duration, out=str(out), no_train=True, gossip_interval=interval,
        sample_interval=interval, seed=1000 * run, live=False, mode="inproc",
    )  # fmt: skip
    if asyncio.run(run_testbed(opts)) != 0:
        raise SystemExit(f"testbed N={n} run {run} failed")
    res = json.loads((out / "results.json").read_text())
    rows = res["consensus"]
    ex = [f["exchanges"] for f in res["final"].values()]
    started = sum(e["ok"] + e["busy"] + e["aborted"] + e["failed"] for e in ex)
    durations = [e["mean_duration_s"] for e in ex if e["mean_duration_s"] is not None] or [0.0]
    paces = [e["pace_s"] for e in ex if e.get("pace_s") is not None] or [interval]
    stats = {
        "d": statistics.mean(durations) / interval,  # a committed exchange's duration, in intervals
        "pace": statistics.median(paces) / interval,  # the nodes' pacing at the end, in intervals
        "not_committed": (started - sum(e["ok"] for e in ex)) / max(started, 1),
        "busy": sum(e["busy"] for e in ex) / max(started, 1),
    }
    return np.array([r["consensus_distance"] ** 2 for r in rows if r["consensus_distance"] is not None]), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sim-runs", type=int, default=40)
    ap.add_argument("--gossip-interval", type=float, default=0.5)
    ap.add_argument("--intervals", type=int, default=30, help="measured gossip intervals per run")
    ap.add_argument("--name", default="averaging", help="results/NAME.md and NAME.png")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    theory = theory_large_n()
    rows, curves = [], {}
    for n in args.nodes:
        measured, series, stats = [], [], []
        for r in range(args.runs):
            suffix = "" if args.name == "averaging" else f"-{args.name}"
            v, st = measure(n, r, args.gossip_interval, args.intervals * args.gossip_interval,
                            RESULTS / "averaging" / f"n{n}-run{r}{suffix}")  # fmt: skip
            measured.append(reduction_factor(v, burn_in=1, floor=FLOOR))
            series.append(v / v[0])
            stats.append(st)
        d = statistics.mean(st["d"] for st in stats)
        pace = max(1.0, statistics.mean(st["pace"] for st in stats))
        counts: dict[str, int] = {}
        sims = [
            reduction_factor(
                simulate_pushpull(n, 60, seed, duration=d, overlap="abort", counts=counts, pace=pace), floor=FLOOR
            )
            for seed in range(args.sim_runs)
        ]
        m, s = statistics.mean(measured), statistics.mean(sims)
        ended = counts["committed"] + counts["aborted"]
        lost = statistics.mean(st["not_committed"] for st in stats), counts["aborted"] / max(ended, 1)
        busy = statistics.mean(st["busy"] for st in stats)
        rows.append(
            (
                n,
                m,
                statistics.stdev(measured) if len(measured) > 1 else 0.0,
                s,
                statistics.stdev(sims),
                d,
                lost,
                busy,
                pace,
            )
        )
        curves[n] = (series, simulate_pushpull(n, args.intervals, 0, duration=d, overlap="abort", pace=pace))
        print(f"N={n}: measured {m:.3f} ({', '.join(f'{x:.3f}' for x in measured)}), simulated {s:.3f}", flush=True)

    table = [
        "| N | measured factor per interval (mean ± std over runs) | simulated (same protocol) | measured / simulated "
        "| exchange duration / interval (measured) | pace / interval (measured) "
        "| not committed: measured (of which 409) / simulated "
        "| theory, large N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m, ms, s, ss, d, lost, busy, pace in rows:
        table.append(f"| {n} | {m:.3f} ± {ms:.3f} ({args.runs} runs) | {s:.3f} ± {ss:.3f} ({args.sim_runs} runs) "
                     f"| {m / s:.2f} | {d:.3f} | {pace:.2f} | {lost[0]:.1%} ({busy:.1%}) / {lost[1]:.1%} "
                     f"| {theory:.3f} |")  # fmt: skip
    report = f"""# Pure averaging against theory

Run {started} on {platform.node()} ({platform.machine()}, Python {platform.python_version()}):
`python benchmarks/averaging.py --nodes {" ".join(map(str, args.nodes))} --runs {args.runs} \
--gossip-interval {args.gossip_interval:g} --intervals {args.intervals}\
{"" if args.name == "averaging" else " --name " + args.name}`

In-process testbed, `--no-train`, `digits` MLP (4,810 parameters, different random initialisation per
node), gossip interval {args.gossip_interval:g} s, models sampled over HTTP once per interval. Factor = exp(slope) of
log V(t) per gossip interval, fitted from the first interval until V falls below {FLOOR:g} V(0). The
simulation runs with each N's measured mean exchange duration (a committed exchange, start to commit
answered) as a share d of the interval and the nodes' measured pace (intervals between the exchanges
a node starts, at least 1), and aborts an exchange when either side merged during it, as the nodes
do; "not committed" is the share of exchanges started that did not commit (declined with
409, aborted, or failed).

{chr(10).join(table)}

![variance over time]({args.name}.png)
"""
    (RESULTS / f"{args.name}.md").write_text(report)
    plot(curves, RESULTS / f"{args.name}.png")
    print(report)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (n, (series, sim)) in zip(axes[0], curves.items(), strict=True):
        for i, v in enumerate(series):
            ax.semilogy(np.arange(len(v)), v, color="C0", alpha=0.7, label="measured" if i == 0 else None)
        ax.semilogy(np.arange(len(sim)), sim / sim[0], color="C1", ls="--", label="simulated")
        ax.set(title=f"N = {n}", xlabel="gossip intervals", ylabel="V(t) / V(0)", ylim=(1e-14, 2))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

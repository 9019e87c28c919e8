"""Benchmark of the node daemon (issue 2): real node processes on loopback, real mDNS, real HTTP.

Two runs of the process testbed:
  1. training: N nodes on IID shards of `digits` for D seconds -> final test accuracy per node;
  2. pure averaging (--no-train): how fast the consensus distance falls, in gossip intervals, and how
     far the network mean moves.
Writes benchmarks/results/node_daemon.md (tables), node_daemon.png (plot) and the raw results.json
files under benchmarks/results/node_daemon/.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/node_daemon.py [--nodes 8] [--duration 60] [--averaging-duration 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import time
from pathlib import Path

from gossipfl.config import GOSSIP_INTERVAL_S
from gossipfl.testbed import TestbedOptions, relative, run_testbed

RESULTS = Path(__file__).parent / "results"


def run(opts: TestbedOptions) -> dict:
    code = asyncio.run(run_testbed(opts))
    if code != 0:
        raise SystemExit(f"testbed failed with exit code {code}")
    return json.loads((Path(opts.out) / "results.json").read_text())


def intervals_to_reduce(series: list[dict], factor: float, interval: float) -> float | None:
    """Gossip intervals from the first sample until the consensus distance is `factor` times smaller."""
    rows = [r for r in series if r["consensus_distance"] is not None]
    if not rows:
        return None
    t0, d0 = rows[0]["t"], rows[0]["consensus_distance"]
    for r in rows:
        if r["consensus_distance"] <= d0 / factor:
            return (r["t"] - t0) / interval
    return None


def training_table(res: dict) -> str:
    lines = ["| node | test accuracy | test loss | exchanges ok | failed | busy |", "|---|---|---|---|---|---|"]
    for node_id, f in res["final"].items():
        ex = f["exchanges"] or {}
        lines.append(
            f"| {node_id} | {f['accuracy']:.4f} | {f['loss']:.4f} | {ex.get('ok', 0)} | {ex.get('failed', 0)} "
            f"| {ex.get('busy', 0)} |"
        )
    s = res["summary"]
    rel = s.get("consensus_distance_relative_last")
    lines.append(
        f"\nmean {s['accuracy_mean']:.4f}, min {s['accuracy_min']:.4f}, max {s['accuracy_max']:.4f}, "
        f"spread {s['accuracy_spread']:.4f}"
        + (f"; final consensus distance {100 * rel:.2g}% of the mean model's norm" if rel is not None else "")
    )
    return "\n".join(lines)


def averaging_table(res: dict, interval: float) -> str:
    rows = [r for r in res["consensus"] if r["consensus_distance"] is not None]
    d0 = rows[0]["consensus_distance"]
    lines = ["| t (s) | intervals | consensus distance | reduction | mean shift (relative) |", "|---|---|---|---|---|"]
    for r in rows:
        red = d0 / r["consensus_distance"] if r["consensus_distance"] > 0 else math.inf
        lines.append(
            f"| {r['t']:.1f} | {(r['t'] - rows[0]['t']) / interval:.1f} | {r['consensus_distance']:.3e} "
            f"| {red:.3g}x | {r.get('mean_shift_relative', 0.0):.1e} |"
        )
    return "\n".join(lines)


def plot(train: dict, avg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for node_id, series in train["nodes"].items():
        pts = [(t, a) for t, a in series["accuracy"] if a is not None]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=node_id)
    axes[0].set(title="training: test accuracy per node", xlabel="seconds", ylabel="accuracy", ylim=(0, 1))
    axes[0].axhline(0.93, color="grey", ls=":", lw=1)
    rows = [(r["t"], relative(r)) for r in train["consensus"]]
    rows = [(t, rel) for t, rel in rows if rel]
    axes[1].plot([t for t, _ in rows], [100 * rel for _, rel in rows], marker=".")
    axes[1].set(
        title="training: consensus distance / mean model's norm",
        xlabel="seconds",
        ylabel="% (nodes start from one model)",
        ylim=(0, None),
    )
    rows = [r for r in avg["consensus"] if r["consensus_distance"]]
    axes[2].semilogy([r["t"] for r in rows], [r["consensus_distance"] for r in rows], marker=".")
    axes[2].set(title="pure averaging (--no-train): consensus distance", xlabel="seconds", ylabel="RMS distance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--averaging-duration", type=float, default=25.0)
    ap.add_argument("--gossip-interval", type=float, default=GOSSIP_INTERVAL_S, help="training run (the default's)")
    ap.add_argument(
        "--averaging-interval", type=float, default=1.0, help="pure-averaging run (sampled once a second: 1 s)"
    )
    args = ap.parse_args()
    raw = RESULTS / "node_daemon"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    train = run(TestbedOptions(nodes=args.nodes, duration=args.duration, out=str(raw / "training"), live=False,
                               gossip_interval=args.gossip_interval))  # fmt: skip
    avg = run(TestbedOptions(nodes=args.nodes, duration=args.averaging_duration, out=str(raw / "averaging"),
                             no_train=True, gossip_interval=args.averaging_interval, live=False))  # fmt: skip
    i100 = intervals_to_reduce(avg["consensus"], 100, args.averaging_interval)
    i20 = [r for r in avg["consensus"] if r["consensus_distance"] is not None]
    at20 = next((r for r in i20 if r["t"] - i20[0]["t"] >= 20 * args.averaging_interval), i20[-1])
    shift = max(r.get("mean_shift_relative", 0.0) for r in avg["consensus"])
    report = f"""# Node daemon benchmark

Run {started} on {platform.node()} ({platform.machine()}, {platform.python_version()}), command:
`python benchmarks/node_daemon.py --nodes {args.nodes} --duration {args.duration:g} \
--averaging-duration {args.averaging_duration:g} --gossip-interval {args.gossip_interval:g} \
--averaging-interval {args.averaging_interval:g}`

Each node is its own process on 127.0.0.1 (mDNS on loopback, HTTP gossip), training the `digits` MLP
on a stratified IID shard (1/{args.nodes} of the 1437 training images), all starting from one initial
model, and evaluated on the shared 360-image test split. Times count from the moment all nodes answer
HTTP and have found each other.

## Training, {args.nodes} nodes, {args.duration:g} s, gossip every {args.gossip_interval:g} s

{training_table(train)}

## Pure averaging (--no-train), {args.nodes} nodes, gossip every {args.averaging_interval:g} s

Consensus distance = sqrt(1/N sum_i ||x_i - mean||^2) over all parameters, sampled once a second
over HTTP (the nodes are read one after another, so a sample can straddle an exchange; the mean
shift column shows that noise).

- intervals until 100x smaller: **{i100 if i100 is None else f"{i100:.0f}"}**
- reduction after 20 intervals: **{i20[0]["consensus_distance"] / at20["consensus_distance"]:.3g}x**
- largest relative shift of the network mean seen: {shift:.1e}

{averaging_table(avg, args.averaging_interval)}

![plot](node_daemon.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "node_daemon.md").write_text(report)
    plot(train, avg, RESULTS / "node_daemon.png")
    print(report)


if __name__ == "__main__":
    main()

"""Gossip learning against centralized and local-only training, on IID and label-skewed data.

For every N, partition scheme and merge rule, runs the in-process testbed on `digits` (real HTTP and
mDNS on loopback) and records test accuracy (mean and min over nodes) against wall time and against
bytes sent per node. References, trained here with the nodes' own recipe (`NodeConfig` defaults):
- centralized: one model on the union of the data, for the same total number of minibatch steps as
  the whole network made (N x the steps of one node: the same total epochs);
- local only: each node's model on its own shard alone, for the steps one node made.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/convergence.py [--nodes 8 16 32] [--schemes iid dirichlet:0.5 dirichlet:0.1]
        [--rules average age samples pushsum] [--duration 90] [--gossip-interval 0.25]

Writes benchmarks/results/convergence.md (table), convergence.png (plots) and the raw results.json
files under benchmarks/results/convergence/ (about 14 MB for the full grid, not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gossipfl.config import NodeConfig
from gossipfl.learning.digits import DigitsTask
from gossipfl.learning.partition import label_skew, partition
from gossipfl.learning.task import Dataset
from gossipfl.node import build_learner
from gossipfl.testbed import TestbedOptions, run_testbed

RESULTS = Path(__file__).parent / "results"
TASK = DigitsTask()


def train_alone(train: Dataset, test: Dataset, steps: int, seed: int) -> float:
    learner = build_learner(TASK, train, test, replace(NodeConfig(), seed=seed))
    learner.train_steps(steps)
    return learner.evaluate().accuracy or 0.0


def gossip(n: int, scheme: str, rule: str, duration: float, interval: float) -> dict:
    out = RESULTS / "convergence" / f"n{n}-{scheme.replace(':', '')}-{rule}"
    opts = TestbedOptions(
        nodes=n, duration=duration, out=str(out), live=False, mode="inproc",
        extra_node_args=("--partition-scheme", scheme, "--merge", rule, "--gossip-interval", str(interval)),
    )  # fmt: skip
    if asyncio.run(run_testbed(opts)) != 0:
        raise SystemExit(f"testbed failed: N={n} {scheme} {rule}")
    return json.loads((out / "results.json").read_text())


def curves(res: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Time, mean and min accuracy over nodes, and mean MB sent per node, at each sample."""
    nodes = list(res["nodes"].values())
    length = min(len(v["accuracy"]) for v in nodes)
    t = np.array([nodes[0]["accuracy"][i][0] for i in range(length)])
    acc = np.array([[v["accuracy"][i][1] or 0.0 for v in nodes] for i in range(length)])
    sent = np.array([[v["bytes_sent"][i][1] for v in nodes] for i in range(length)]) / 1e6
    return t, acc.mean(axis=1), acc.min(axis=1), sent.mean(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--schemes", nargs="+", default=["iid", "dirichlet:0.5", "dirichlet:0.1"])
    ap.add_argument("--rules", nargs="+", default=["average", "age", "samples", "pushsum"])
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--gossip-interval", type=float, default=0.25, help="seconds between a node's exchanges")
    ap.add_argument("--seeds", type=int, default=5, help="seeds for the centralized reference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data = TASK.load_data(NodeConfig().data_seed)
    rows, panels, spreads = [], [], []
    cfg = NodeConfig()
    for n in args.nodes:
        for scheme in args.schemes:
            shards = partition(data.train.y, n, scheme, NodeConfig().data_seed)
            skew = label_skew(data.train.y, shards, data.num_classes)
            runs = {rule: gossip(n, scheme, rule, args.duration, args.gossip_interval) for rule in args.rules}
            steps = int(statistics.median(f["age"] for r in runs.values() for f in r["final"].values()))
            seeded = [train_alone(data.train, data.test, n * steps, s) for s in range(args.seeds)]
            central = statistics.mean(seeded)
            spreads.append(f"N={n} {scheme}: {min(seeded):.4f}-{max(seeded):.4f} ({n * steps:,} steps)")
            local = [train_alone(data.train.subset(idx), data.test, steps, k) for k, idx in enumerate(shards)]
            rows.append((n, scheme, skew, "centralized (same total epochs)", central, central, None))
            rows.append((n, scheme, skew, "local only", statistics.mean(local), min(local), 0.0))
            for rule, res in runs.items():
                t, mean, low, sent = curves(res)
                s = res["summary"]
                rows.append((n, scheme, skew, f"gossip, {rule}", s["accuracy_mean"], s["accuracy_min"], sent[-1]))
                panels.append((n, scheme, rule, t, mean, low, sent, central, statistics.mean(local)))
            for row in rows[-2 - len(runs) :]:
                print(fmt(row, central), flush=True)
    head = (
        "| N | partition | label skew | training | accuracy mean | accuracy min | vs centralized (mean / min) "
        "| MB sent per node |\n|---|---|---|---|---|---|---|---|"
    )
    centrals = {(r[0], r[1]): r[4] for r in rows if r[3].startswith("centralized")}
    table = "\n".join([head] + [fmt(r, centrals[(r[0], r[1])]) for r in rows])
    report = f"""# Convergence: gossip against centralized and local-only training

Run {started} on {platform.node()} ({platform.machine()}, Python {platform.python_version()}): \
`python benchmarks/convergence.py --nodes {" ".join(map(str, args.nodes))} --schemes {" ".join(args.schemes)} \
--rules {" ".join(args.rules)} --duration {args.duration:g} --gossip-interval {args.gossip_interval:g}`

`digits` (1,437 training and 360 test images; one test image is 0.28 points), MLP 64-64-10, the node
defaults: {recipe(cfg)}; {cfg.steps_per_round / cfg.train_interval:g} steps/s per node, gossip interval
{args.gossip_interval:g} s (so about {cfg.steps_per_round / cfg.train_interval * args.gossip_interval:g}
local steps per exchange); in-process testbed, {args.duration:g} s from the moment all nodes know each
other. Label skew = mean total-variation distance between a node's class distribution and the global one.
Centralized and local-only models are trained here with the same recipe. Centralized: mean of
{args.seeds} seeds, for N x the median model age of the gossip runs in steps (same total epochs); range
over seeds: {"; ".join(spreads)}.

{table}

![accuracy over time and over bytes](convergence.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convergence.md").write_text(report)
    plot(panels, args, RESULTS / "convergence.png")
    print(report)


def recipe(cfg: NodeConfig) -> str:
    step = f"lr {cfg.lr:g}" + (f" decaying as lr/(1+age/{cfg.lr_decay_steps:g})" if cfg.lr_decay_steps else "")
    opt = f"SGD momentum {cfg.momentum:g}" if cfg.optimizer == "sgd" else "Adam"
    return f"{opt}, {step}, batch {cfg.batch_size}"


def fmt(row: tuple, central: float) -> str:
    n, scheme, skew, name, mean, low, mb = row
    delta = f"{100 * (mean - central):+.1f} / {100 * (low - central):+.1f} pt"
    sent = "-" if mb is None else f"{mb:.1f}"
    return f"| {n} | {scheme} | {skew:.2f} | {name} | {mean:.4f} | {low:.4f} | {delta} | {sent} |"


def plot(panels: list, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(n, s) for n in args.nodes for s in args.schemes]
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7.5), squeeze=False)
    for col, (n, scheme) in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        mine = [p for p in panels if (p[0], p[1]) == (n, scheme)]
        for _, _, rule, t, mean, low, sent, _, _ in mine:
            color = f"C{args.rules.index(rule)}"
            top.plot(t, mean, color=color, label=rule)
            top.plot(t, low, color=color, ls=":", lw=1)
            bottom.plot(sent, mean, color=color, label=rule)
        central, local = mine[0][7], mine[0][8]
        for ax in (top, bottom):
            ax.axhline(central, color="black", ls="--", lw=1, label="centralized")
            ax.axhline(local, color="grey", ls="-.", lw=1, label="local only")
        top.set(title=f"N={n}, {scheme}", xlabel="seconds", ylabel="test accuracy (dotted: min)", ylim=(0, 1))
        bottom.set(xlabel="MB sent per node", ylabel="mean test accuracy (zoomed)", ylim=(0.85, 1))
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

"""Gossip learning against centralized and local-only training, on IID and label-skewed data.

For every N, partition scheme and merge rule, runs the in-process testbed on `digits` (real HTTP and
mDNS on loopback) and records test accuracy (mean and min over nodes) against wall time and against
bytes sent per node. References, trained here with the nodes' own recipe (`NodeConfig` defaults plus
any `--node-args`):
- centralized: one model on the union of the data, for the same total number of minibatch steps as
  the whole network made (N x the steps of one node: the same total epochs);
- data-parallel: one model for the steps one node made, each step on N minibatches of the nodes' batch
  size, one drawn from each node's shard (epochs over the shard, as the node itself draws them): what
  synchronous all-reduce SGD over N workers computes, the usual centralized counterpart in the
  decentralized-SGD literature (on skewed shards this is not the same as batches of N x 32 drawn from
  the pooled data: small shards are revisited more often);
- local only: each node's model on its own shard alone, for the steps one node made.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/convergence.py [--nodes 8 16 32] [--schemes iid dirichlet:0.5 dirichlet:0.1]
        [--rules average age samples pushsum] [--duration 90] [--gossip-interval 0.25] [--repeats 1]
        [--reuse] [--name convergence] [--node-args "--lr 0.3"]

Writes benchmarks/results/NAME.md (table), NAME.png (plots), NAME.json (compact raw numbers: every
run's per-node final accuracy, steps and bytes, its mean/min curve, and every reference model's
accuracy; committed) and the testbed's results.json files under benchmarks/results/convergence/
(about 14 MB for the full grid, not committed). With `--node-args "--eval-split validation"` nodes
and references score a hold-out of the training split instead of the test split. With --repeats R every
gossip cell runs R times, run r from initial model I+r (I = the nodes' --init-seed, by default their
--data-seed) with node seeds 1000r.., the table gives the mean and the standard deviation over runs,
and the text the gap to centralized per initial model (mean ± standard error). The references are
paired with the runs: each is trained from the same R initial models, with --seeds minibatch orders
each, so a gap is not an artefact of one lucky or unlucky initialisation (on digits the initial
model alone moves either reference by 0.6 point). --reuse takes a cell's results.json from an
earlier run with the same options instead of running it again (results.json does not record the
code: move old results away after changing how nodes train).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runstats import compact_curve, curves  # noqa: E402

from gossipfl.args import node_config_from_args
from gossipfl.assembly import build_learner, init_seed
from gossipfl.config import NodeConfig
from gossipfl.learning.partition import label_skew, partition
from gossipfl.learning.task import Dataset, TaskData, with_validation
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.testbed import TestbedOptions, run_testbed

RESULTS = Path(__file__).parent / "results"
TASK = DigitsTask()


def train_alone(train: Dataset, test: Dataset, steps: int, cfg: NodeConfig) -> float:
    """A reference model: initialised from ``cfg.init_seed`` (as a node would be), minibatch order from ``cfg.seed``."""
    learner = build_learner(TASK, train, test, cfg)
    learner.train_steps(steps)
    return learner.evaluate().accuracy or 0.0


def reference(data: TaskData, steps: int, cfg: NodeConfig, init: int, orders: int) -> list[float]:
    """Accuracies of ``orders`` reference models from initial model ``init`` on all the data."""
    return [train_alone(data.train, data.test, steps, replace(cfg, init_seed=init, seed=s)) for s in range(orders)]


def per_shard_batches(shards: list[np.ndarray], batch: int, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    """Minibatch indices for synchronous data-parallel SGD over the nodes' shards: every call, ``batch``
    indices from each shard (each shard in epochs of its own random order; unlike a node, which takes a
    short last batch, a batch runs on into the next epoch, so every worker always has ``batch`` samples),
    concatenated, so one step's mean loss weighs every worker equally, as all-reduce of their gradients does."""
    shards_t = [torch.as_tensor(s, dtype=torch.long) for s in shards]
    orders = [torch.empty(0, dtype=torch.long) for _ in shards]
    cursors = [0] * len(shards)

    def next_batch() -> torch.Tensor:
        out = []
        for k, shard in enumerate(shards_t):
            need = batch
            while need:
                if cursors[k] >= len(orders[k]):
                    orders[k], cursors[k] = torch.randperm(len(shard), generator=gen), 0
                piece = orders[k][cursors[k] : cursors[k] + need]
                cursors[k] += len(piece)
                need -= len(piece)
                out.append(shard[piece])
        return torch.cat(out)

    return next_batch


def data_parallel(
    data: TaskData, shards: list[np.ndarray], steps: int, cfg: NodeConfig, init: int, orders: int
) -> list[float]:
    """Accuracies of ``orders`` data-parallel references (see the module's docstring) from initial model ``init``."""
    accs = []
    for s in range(orders):
        c = replace(cfg, init_seed=init, seed=s, batch_size=len(shards) * cfg.batch_size)
        learner = build_learner(TASK, data.train, data.test, c)
        learner._next_batch = per_shard_batches(shards, cfg.batch_size, torch.Generator().manual_seed(s))
        learner.train_steps(steps)
        accs.append(learner.evaluate().accuracy or 0.0)
    return accs


def gossip(n: int, scheme: str, rule: str, repeat: int, init: int, args: argparse.Namespace) -> dict:
    """One testbed run from initial model ``init`` (node seeds 1000 x repeat + i); an earlier run with the
    same options when --reuse."""
    variant = "" if args.gossip_interval == 0.25 else f"-gi{args.gossip_interval:g}"
    if args.node_args:  # e.g. "--lr 0.3" -> "-lr0.3"
        variant += "-" + re.sub(r"[^A-Za-z0-9.]+", "", args.node_args)
    cell = f"n{n}-{scheme.replace(':', '')}-{rule}{variant}" + (f"-r{repeat}" if repeat else "")
    out = RESULTS / "convergence" / cell
    node_args = ("--partition-scheme", scheme, "--merge", rule, "--gossip-interval", str(args.gossip_interval))
    node_args += tuple(shlex.split(args.node_args))
    if repeat:  # run 0 starts from the nodes' own initial model (so earlier single runs stay reusable)
        node_args += ("--init-seed", str(init))
    opts = TestbedOptions(
        nodes=n, duration=args.duration, out=str(out), live=False, mode="inproc", seed=1000 * repeat,
        extra_node_args=node_args,
    )  # fmt: skip
    found = out / "results.json"
    if args.reuse and found.exists():
        earlier = json.loads(found.read_text())
        if same_options(earlier["options"], opts):
            print(f"reusing {found}", flush=True)
            return earlier
    if asyncio.run(run_testbed(opts)) != 0:
        raise SystemExit(f"testbed failed: N={n} {scheme} {rule} repeat {repeat}")
    return json.loads(found.read_text())


def same_options(earlier: dict, opts: TestbedOptions) -> bool:
    mine = json.loads(json.dumps(asdict(opts)))  # tuples as lists, as results.json has them
    # the nodes' interval is in extra_node_args (last, so it wins): the testbed's own default does not count
    ignored = ("out", "inproc_workers", "gossip_interval")
    return all(earlier.get(k, v) == v for k, v in mine.items() if k not in ignored)


def compact(res: dict) -> dict:
    """What the table and plots need from one testbed run, small enough to commit."""
    return {
        "options": {k: res["options"][k] for k in ("nodes", "duration", "seed", "extra_node_args")},
        "final": {
            node: {k: f.get(k) for k in ("accuracy", "steps", "age")} | {"bytes_sent": f["exchanges"]["bytes_sent"]}
            for node, f in res["final"].items()
        },
        "curve": compact_curve(res),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--schemes", nargs="+", default=["iid", "dirichlet:0.5", "dirichlet:0.1"])
    ap.add_argument("--rules", nargs="+", default=["average", "age", "samples", "pushsum"])
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--gossip-interval", type=float, default=0.25, help="seconds between a node's exchanges")
    ap.add_argument("--seeds", type=int, default=5, help="minibatch orders per initial model for the references")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every gossip cell, each from its own initial model")
    ap.add_argument("--reuse", action="store_true", help="take a cell's earlier results.json if its options match")
    ap.add_argument("--name", default="convergence", help="results/NAME.md and NAME.png")
    ap.add_argument("--node-args", default="", help='node options for the nodes and the references, e.g. "--lr 0.3"')
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cfg = node_config_from_args(shlex.split(args.node_args))
    data = TASK.load_data(cfg.data_seed)
    if cfg.eval_split == "validation":  # as the nodes do: score a hold-out of the training split
        data = with_validation(data, cfg.data_seed)
    inits = [init_seed(cfg) + r for r in range(args.repeats)]  # run r of every cell starts from inits[r]
    rows, panels, spreads, raw = [], [], [], []
    counts: set[str] = set()
    for n in args.nodes:
        for scheme in args.schemes:
            shards = partition(data.train.y, n, scheme, cfg.data_seed)
            skew = label_skew(data.train.y, shards, data.num_classes)
            runs = {rule: [gossip(n, scheme, rule, r, i, args) for r, i in enumerate(inits)] for rule in args.rules}
            finals = [f for rs in runs.values() for r in rs for f in r["final"].values()]
            # a node's own steps; older results have only the model's age (the most among its merged
            # ancestors, ahead of a node's own count), which gives the references more steps
            counted = "steps" if all(f.get("steps") is not None for f in finals) else "age"
            steps = int(statistics.median(f[counted] for f in finals))
            counts.add(counted)
            # per initial model, the mean over minibatch orders (every init has as many, so the mean of
            # these is the mean over all reference runs)
            seeded_all = [reference(data, n * steps, cfg, i, args.seeds) for i in inits]
            parallel_all = [data_parallel(data, shards, steps, cfg, i, args.seeds) for i in inits]
            short = reference(data, steps, cfg, inits[0], args.seeds)  # has the centralized one converged?
            seeded = [statistics.mean(a) for a in seeded_all]
            parallel = [statistics.mean(a) for a in parallel_all]
            central = statistics.mean(seeded)
            raw.append(
                {
                    "nodes": n,
                    "scheme": scheme,
                    "median_steps": steps,
                    "inits": inits,
                    "centralized": seeded_all,
                    "centralized_node_steps": short,
                    "data_parallel": parallel_all,
                    "runs": {rule: [compact(r) for r in rs] for rule, rs in runs.items()},
                }
            )
            spreads.append(
                f"N={n} {scheme}: centralized ({n * steps:,} steps) "
                + ", ".join(f"{a:.4f}" for a in seeded)
                + f" (from the first initial model, {statistics.mean(short):.4f} after only {steps:,} steps)"
                + f"; data-parallel ({steps:,} steps of {n} x {cfg.batch_size}, per shard) "
                + ", ".join(f"{a:.4f}" for a in parallel)
                + "".join(
                    f"; gossip {rule} "
                    + ", ".join(f"{r['summary']['accuracy_mean']:.4f}" for r in rs)
                    + paired_gap([r["summary"]["accuracy_mean"] for r in rs], seeded)
                    for rule, rs in runs.items()
                )
            )
            local = [
                train_alone(data.train.subset(idx), data.test, steps, replace(cfg, init_seed=inits[0], seed=k))
                for k, idx in enumerate(shards)
            ]
            rows.append((n, scheme, skew, "centralized (same total epochs)", [central], [central], None))
            dp = statistics.mean(parallel)
            rows.append((n, scheme, skew, f"data-parallel, {n} x {cfg.batch_size} per shard", [dp], [dp], None))
            rows.append((n, scheme, skew, "local only", [statistics.mean(local)], [min(local)], 0.0))
            for rule, results in runs.items():
                means = [r["summary"]["accuracy_mean"] for r in results]
                lows = [r["summary"]["accuracy_min"] for r in results]
                t, mean, low, sent = curves(results[0])
                rows.append((n, scheme, skew, f"gossip, {rule}", means, lows, sent[-1]))
                panels.append((n, scheme, rule, t, mean, low, sent, central, statistics.mean(local), dp))
            for row in rows[-3 - len(runs) :]:
                print(fmt(row, central), flush=True)
    head = (
        "| N | partition | label skew | training | runs | accuracy mean | accuracy min "
        "| vs centralized (mean / min) | MB sent per node |\n|---|---|---|---|---|---|---|---|---|"
    )
    centrals = {(r[0], r[1]): r[4][0] for r in rows if r[3].startswith("centralized")}
    table = "\n".join([head] + [fmt(r, centrals[(r[0], r[1])]) for r in rows])
    command = (
        f"python benchmarks/convergence.py --nodes {' '.join(map(str, args.nodes))} --schemes {' '.join(args.schemes)} "
        f"--rules {' '.join(args.rules)} --duration {args.duration:g} --gossip-interval {args.gossip_interval:g}"
        + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
        + (f" --name {args.name}" if args.name != "convergence" else "")
        + (f' --node-args "{args.node_args}"' if args.node_args else "")
    )
    several = args.repeats > 1
    report = f"""# Convergence: gossip against centralized and local-only training

Run {started} on {platform.node()} ({platform.machine()}, Python {platform.python_version()}): `{command}`

`digits` (1,437 training and 360 test images; one test image is 0.28 points), MLP 64-64-10, the node
recipe: {recipe(cfg)}; {cfg.steps_per_round / cfg.train_interval:g} steps/s per node, gossip interval \
{args.gossip_interval:g} s (so about {cfg.steps_per_round / cfg.train_interval * args.gossip_interval:g} \
local steps per exchange); in-process testbed, {args.duration:g} s from the moment all nodes know each
other. Label skew = mean total-variation distance between a node's class distribution and the global one.
Centralized and local-only models are trained here with the same recipe, and the references from the
same initial models as the gossip runs ({", ".join(map(str, inits))}): centralized for N x S steps (same total epochs),
S the median over nodes of {" or ".join(sorted(counts))} (`steps`: a node's own minibatch steps; `age`: the model's,
the most among its merged ancestors); data-parallel for S steps, each on N
minibatches of {cfg.batch_size}, one from each node's shard (same total epochs). Each reference is the mean over
{args.seeds} minibatch orders per initial model. By initial model: \
{"; ".join(spreads)}.
{"Gossip rows: mean ± standard deviation over runs (each its own init); plots: the first run. " if several else ""}\
Local only: mean and worst of the nodes' models.

{table}

![accuracy over time and over bytes]({args.name}.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(raw, separators=(",", ":")) + "\n")
    plot(panels, args, RESULTS / f"{args.name}.png")
    print(report)


def paired_gap(runs: list[float], references: list[float]) -> str:
    """Mean and standard error of run - reference over initial models ('' for a single run)."""
    gaps = [100 * (a - b) for a, b in zip(runs, references, strict=True)]
    if len(gaps) < 2:
        return ""
    se = statistics.stdev(gaps) / len(gaps) ** 0.5
    return f" (paired gap to centralized {statistics.mean(gaps):+.2f} ± {se:.2f} pt, mean ± standard error)"


def recipe(cfg: NodeConfig) -> str:
    decay = f" decaying as lr/(1+steps/{cfg.lr_decay_steps:g}) (a node's own steps)" if cfg.lr_decay_steps else ""
    step = f"lr {cfg.lr:g}{decay}"
    opt = f"SGD momentum {cfg.momentum:g}" if cfg.optimizer == "sgd" else "Adam"
    return f"{opt}, {step}, batch {cfg.batch_size}"


def fmt(row: tuple, central: float) -> str:
    """A table row; accuracy cells are the mean over runs, +- the standard deviation when several."""
    n, scheme, skew, name, means, lows, mb = row
    runs = len(means) if name.startswith("gossip") else "-"

    def cell(values: list[float]) -> str:
        sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.4f}{sd}"

    mean, low = statistics.mean(means), statistics.mean(lows)
    delta = f"{100 * (mean - central):+.1f} / {100 * (low - central):+.1f} pt"
    sent = "-" if mb is None else f"{mb:.1f}"
    return f"| {n} | {scheme} | {skew:.2f} | {name} | {runs} | {cell(means)} | {cell(lows)} | {delta} | {sent} |"


def plot(panels: list, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(n, s) for n in args.nodes for s in args.schemes]
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7.5), squeeze=False)
    for col, (n, scheme) in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        mine = [p for p in panels if (p[0], p[1]) == (n, scheme)]
        for _, _, rule, t, mean, low, sent, *_ in mine:
            color = f"C{args.rules.index(rule)}"
            top.plot(t, mean, color=color, label=rule)
            top.plot(t, low, color=color, ls=":", lw=1)
            bottom.plot(sent, mean, color=color, label=rule)
        central, local, dp = mine[0][7], mine[0][8], mine[0][9]
        for ax in (top, bottom):
            ax.axhline(central, color="black", ls="--", lw=1, label="centralized")
            ax.axhline(dp, color="black", ls=":", lw=1, label="data-parallel (per shard)")
            ax.axhline(local, color="grey", ls="-.", lw=1, label="local only")
        top.set(title=f"N={n}, {scheme}", xlabel="seconds", ylabel="test accuracy (dotted: min)", ylim=(0, 1))
        bottom.set(xlabel="MB sent per node", ylabel="mean test accuracy (zoomed)", ylim=(0.85, 1))
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

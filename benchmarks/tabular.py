"""Unscaled tables with real nodes: `--task tabular` and the node defaults, against a model trained
centrally on the same rows and against each node alone.

For every table of scikit-learn whose columns differ in scale by orders of magnitude (breast_cancer:
30 columns from about 0.001 to about 4,000; wine: 13 columns from about 0.1 to about 1,700), every
node count and partition (IID, Dirichlet label skew) and every data seed (a seed draws another
train/test split and partition), runs the in-process testbed (real HTTP and mDNS on loopback): N
nodes, all reading the same CSV, each keeping its shard of the training rows (`--partition K/N`) and
scoring the shared held-out rows. References, trained here with the same defaults on the same rows:
- centralized: one model on all training rows, for as many steps as the whole network made (N x a
  node's median steps) and, to show it has converged, for a node's steps only;
- alone: each node's model on its own shard only, for a node's steps.

Nothing is tuned: the nodes get only the options named on the command line (by default none but
`--partition-scheme`). `--eval-split validation` scores a hold-out of the training rows instead of
the test rows (choose settings there; report the test rows once).

    .venv/bin/pip install -e '.[bench,test]'        # matplotlib; scikit-learn for the tables
    .venv/bin/python benchmarks/tabular.py [--nodes 4 8] [--schemes iid dirichlet:0.5] [--seeds 3]
        [--duration 30] [--eval-split test] [--node-args "--optimizer adam --lr 0.003"] [--name tabular]

Writes benchmarks/results/NAME.md (table), NAME.png (accuracy against time and MB sent) and
NAME.json (every run's per-node final accuracy and steps, and its mean/min curve: the raw numbers
the table is computed from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runstats import compact_curve, half_width95  # noqa: E402

from gossipfl.args import node_config_from_args
from gossipfl.assembly import build_learner
from gossipfl.config import NodeConfig
from gossipfl.learning.partition import label_skew, partition
from gossipfl.learning.task import TaskData, with_validation
from gossipfl.learning.tasks.tabular import TabularTask
from gossipfl.testbed import TestbedOptions, run_testbed

RESULTS = Path(__file__).parent / "results"
TABLES = ("breast_cancer", "wine")


def write_csv(name: str, folder: Path) -> Path:
    """The scikit-learn table as the CSV a user would bring: a header, numeric columns, the class last."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    path = folder / f"{name}.csv"
    header = ",".join([*(c.replace(" ", "_") for c in bunch.feature_names), "class"])
    np.savetxt(path, np.column_stack([bunch.data, bunch.target]), delimiter=",", header=header, comments="", fmt="%.6g")
    return path


def load(path: Path, cfg: NodeConfig) -> tuple[TabularTask, TaskData]:
    task = TabularTask(str(path))
    data = task.load_data(cfg.data_seed)
    return task, (with_validation(data, cfg.data_seed) if cfg.eval_split == "validation" else data)


def trained(task: TabularTask, data: TaskData, idx: np.ndarray | None, steps: int, cfg: NodeConfig) -> float:
    train = data.train if idx is None else data.train.subset(idx)
    learner = build_learner(task, train, data.test, cfg)
    learner.train_steps(steps)
    return learner.evaluate().accuracy or 0.0


def run_cell(path: Path, n: int, scheme: str, data_seed: int, args: argparse.Namespace, out: Path) -> dict:
    node_args = ("--partition-scheme", scheme, "--data-seed", str(data_seed), *shlex.split(args.node_args))
    if args.eval_split != "test":
        node_args += ("--eval-split", args.eval_split)
    opts = TestbedOptions(
        nodes=n, duration=args.duration, out=str(out), live=False, mode="inproc", task="tabular", data=str(path),
        seed=100 * data_seed, gossip_interval=node_config_from_args(list(node_args)).gossip_interval,
        extra_node_args=node_args,
    )  # fmt: skip
    if asyncio.run(run_testbed(opts)) != 0:
        raise SystemExit(f"testbed failed: {path.stem} N={n} {scheme} data seed {data_seed}")
    res = json.loads((out / "results.json").read_text())
    cfg = node_config_from_args(["--task", "tabular", "--data", str(path), *node_args])
    task, data = load(path, cfg)
    shards = partition(data.train.y, n, scheme, data_seed)
    finals = list(res["final"].values())
    steps = int(statistics.median(f["steps"] for f in finals))
    return {
        "table": path.stem,
        "nodes": n,
        "scheme": scheme,
        "data_seed": data_seed,
        "skew": round(label_skew(data.train.y, shards, data.num_classes), 3),
        "train_rows": len(data.train),
        "eval_rows": len(data.test),
        "node_accuracy": [round(f["accuracy"] or 0.0, 4) for f in finals],  # None: never evaluated
        "node_steps": [f["steps"] for f in finals],
        "central_network_steps": round(trained(task, data, None, n * steps, cfg), 4),
        "central_node_steps": round(trained(task, data, None, steps, cfg), 4),
        "alone": [round(trained(task, data, idx, steps, replace(cfg, seed=k)), 4) for k, idx in enumerate(shards)],
        "curve": compact_curve(res),  # [seconds, mean accuracy, min accuracy, mean MB sent per node]
        "startup_s": res["summary"]["startup_s"],
    }


def ci95(values: list[float]) -> str:
    """Mean ± the half-width of a t-interval (95%) over the values, in points."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{100 * mean:+.1f}"
    return f"{100 * mean:+.1f} ± {100 * half_width95(values):.1f}"


def table(runs: list[dict], eval_split: str) -> str:
    head = (
        f"| table | N | partition | label skew | central ({eval_split}) | worst node | mean node | worst alone "
        "| worst node - central, per seed | worst node - central (95% CI) | worst node - worst alone |\n"
        + "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    keys = sorted({(r["table"], r["nodes"], r["scheme"]) for r in runs}, key=lambda k: (TABLES.index(k[0]), k[1], k[2]))
    for name, n, scheme in keys:
        rs = [r for r in runs if (r["table"], r["nodes"], r["scheme"]) == (name, n, scheme)]
        central = [r["central_network_steps"] for r in rs]
        worst = [min(r["node_accuracy"]) for r in rs]
        mean = [statistics.mean(r["node_accuracy"]) for r in rs]
        alone = [min(r["alone"]) for r in rs]
        gaps = [w - c for w, c in zip(worst, central, strict=True)]
        lines.append(
            f"| {name} | {n} | {scheme} | {statistics.mean(r['skew'] for r in rs):.2f} "
            f"| {statistics.mean(central):.3f} "
            f"| {statistics.mean(worst):.3f} | {statistics.mean(mean):.3f} | {statistics.mean(alone):.3f} "
            f"| {', '.join(f'{100 * g:+.1f}' for g in gaps)} | {ci95(gaps)} pt "
            f"| {ci95([w - a for w, a in zip(worst, alone, strict=True)])} pt |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["table"], r["scheme"]) for r in runs}, key=lambda k: (TABLES.index(k[0]), k[1]))
    counts = sorted({r["nodes"] for r in runs})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    for col, (name, scheme) in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        for r in (r for r in runs if (r["table"], r["scheme"]) == (name, scheme)):
            c = np.array(r["curve"])
            color = f"C{counts.index(r['nodes'])}"
            label = f"{r['nodes']} nodes (min dotted)" if r["data_seed"] == runs[0]["data_seed"] else None
            top.plot(c[:, 0], c[:, 2], color=color, ls=":", lw=1)
            top.plot(c[:, 0], c[:, 1], color=color, lw=1, label=label)
            bottom.plot(c[:, 3], c[:, 1], color=color, lw=1, label=label)
        central = statistics.mean(
            r["central_network_steps"] for r in runs if (r["table"], r["scheme"]) == (name, scheme)
        )
        for ax in (top, bottom):
            ax.axhline(central, color="black", ls="--", lw=1, label="centralized")
        top.set(title=f"{name}, {scheme}", xlabel="seconds", ylabel="accuracy (one line per data seed)", ylim=(0.3, 1))
        bottom.set(xlabel="MB sent per node", ylabel="mean accuracy", ylim=(0.3, 1))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--schemes", nargs="+", default=["iid", "dirichlet:0.5"])
    ap.add_argument("--seeds", type=int, default=3, help="data seeds (train/test split and partition) per cell")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of every testbed run")
    ap.add_argument("--eval-split", default="test", choices=("test", "validation"))
    ap.add_argument("--node-args", default="", help="extra node options (none: the defaults)")
    ap.add_argument("--name", default="tabular")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tables:
            path = write_csv(name, Path(tmp))
            for n in args.nodes:
                for scheme in args.schemes:
                    for s in range(args.seeds):
                        r = run_cell(path, n, scheme, 2026 + s, args, Path(tmp) / f"{name}-{n}-{scheme}-{s}")
                        runs.append(r)
                        print(
                            f"{name} N={n} {scheme} seed {r['data_seed']}: nodes {min(r['node_accuracy']):.3f}.."
                            f"{max(r['node_accuracy']):.3f}, central {r['central_network_steps']:.3f} "
                            f"({r['central_node_steps']:.3f} at a node's steps), alone {min(r['alone']):.3f}.."
                            f"{max(r['alone']):.3f}",
                            flush=True,
                        )
    command = "python benchmarks/tabular.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v))}"
        for k, v in vars(args).items()
        if v != ap.get_default(k)
    )
    cfg = node_config_from_args(shlex.split(args.node_args))
    rows = {f"{r['table']}: {r['train_rows']} training rows, {r['eval_rows']} scored" for r in runs}
    report = f"""# Unscaled tables: `--task tabular` with real nodes against central training

Run {started} on {platform.node()} ({platform.machine()}, Python {platform.python_version()}): `{command.strip()}`

In-process testbed (real HTTP and mDNS on loopback), {args.duration:g} s from the moment all nodes
know each other; node options: {args.node_args or "none (the defaults)"}: {cfg.optimizer}, lr {cfg.lr:g}, gossip
every {cfg.gossip_interval:g} s. Scored on the {args.eval_split} rows ({"; ".join(sorted(rows))}), so one
row is several points on wine. {args.seeds} data seeds per cell (each its own split and partition);
per seed, the centralized reference is trained on the same training rows for the network's total
steps. Gaps: the worst node's accuracy minus the reference's, per seed and as mean ± the 95% t-interval
half-width over seeds. Raw numbers: [{args.name}.json]({args.name}.json).

{table(runs, args.eval_split)}

Centralized for only a node's steps (has the reference converged?): {
        "; ".join(
            f"{r['table']} N={r['nodes']} {r['scheme']} seed {r['data_seed']}: "
            f"{r['central_node_steps']:.3f} vs {r['central_network_steps']:.3f}"
            for r in runs
            if r["scheme"] == args.schemes[0] and r["nodes"] == args.nodes[-1]
        )
    }.

![accuracy over time and MB sent]({args.name}.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(runs, separators=(",", ":")) + "\n")
    plot(runs, RESULTS / f"{args.name}.png")
    print(report)


if __name__ == "__main__":
    main()

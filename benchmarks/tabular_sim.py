"""Unscaled tables, in a round-based simulation (no network): each table of scikit-learn whose columns
differ in scale by orders of magnitude, split over 4 nodes (IID and Dirichlet(0.5)), node defaults;
a model trained centrally on all rows, 4 nodes averaging pairwise every 5 local steps, and each node
alone, with and without the ``Standardize`` input layer. Prints one line per table and variant:
central accuracy, and (worst gossiping node, worst node alone) per partition, on the test split.

    .venv/bin/python benchmarks/tabular_sim.py            # needs scikit-learn (the test extra)
    .venv/bin/python benchmarks/tabular_sim.py --eval-split validation --seeds 3 --node-args "--optimizer adam"

Seconds per run, so it is where settings for tables are compared (on ``--eval-split validation``, a
hold-out of the training rows) before the benchmark with real nodes (``tabular.py``). With several
``--seeds`` (data seeds: another split and partition each) it prints the mean over seeds.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from torch import nn

from gossipfl.args import node_config_from_args
from gossipfl.assembly import build_learner
from gossipfl.learning.partition import partition
from gossipfl.learning.task import with_validation
from gossipfl.learning.tasks.tabular import TabularTask

sys.path.insert(0, str(Path(__file__).parent))
from learning_sim import pairwise_round  # noqa: E402

TABLES = {"breast_cancer": load_breast_cancer, "wine": load_wine}


def gossip(nodes: list, rounds: int, steps: int, rng: random.Random) -> None:
    for _ in range(rounds):
        for n in nodes:
            n.train_steps(steps)
        pairwise_round(nodes, rng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1200, help="local steps of every model")
    ap.add_argument("--data-seed", type=int, default=2026, help="the first data seed")
    ap.add_argument("--seeds", type=int, default=1, help="data seeds (split and partition), from --data-seed on")
    ap.add_argument("--eval-split", choices=("test", "validation"), default="test")
    ap.add_argument("--node-args", default="", help='node options for every model, e.g. "--optimizer adam"')
    ap.add_argument("--variants", nargs="+", default=["without Standardize", "with Standardize"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = args.steps // 5
    with tempfile.TemporaryDirectory() as tmp:
        for name, loader in TABLES.items():
            x, y = loader(return_X_y=True)
            path = Path(tmp) / f"{name}.npz"
            np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
            for variant in args.variants:
                rows = [
                    one_seed(path, variant, seed, args, rounds)
                    for seed in range(args.data_seed, args.data_seed + args.seeds)
                ]
                row = {k: tuple(round(statistics.mean(r[k][i] for r in rows), 3) for i in range(len(rows[0][k])))
                       for k in rows[0]}  # fmt: skip
                print(f"{name:14} {variant:20} {row}", flush=True)


def one_seed(path: Path, variant: str, seed: int, args: argparse.Namespace, rounds: int) -> dict[str, tuple]:
    """{"central": (accuracy,), scheme: (worst gossiping node, worst node alone)} for one data seed."""
    task = TabularTask(str(path))
    if variant == "without Standardize":
        d, h, c = task.x.shape[1], task.hidden, task.classes
        task.build_model = lambda d=d, h=h, c=c: nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))
    cfg = node_config_from_args(["--data-seed", str(seed), *shlex.split(args.node_args)])
    data = task.load_data(seed)
    if args.eval_split == "validation":
        data = with_validation(data, seed)
    central = build_learner(task, data.train, data.test, cfg)
    central.train_steps(args.steps)
    row: dict[str, tuple] = {"central": (central.evaluate().accuracy,)}
    for scheme in ("iid", "dirichlet:0.5"):
        shards = partition(data.train.y, args.nodes, scheme, seed)
        nodes, alone = (
            [build_learner(task, data.train.subset(s), data.test, replace(cfg, seed=i)) for i, s in enumerate(shards)]
            for _ in range(2)
        )
        for a in alone:
            a.train_steps(args.steps)
        gossip(nodes, rounds, 5, random.Random(0))
        row[scheme] = (min(n.evaluate().accuracy for n in nodes), min(a.evaluate().accuracy for a in alone))
    return row


if __name__ == "__main__":
    main()

"""Unscaled tables, in a round-based simulation (no network): each table of scikit-learn whose columns
differ in scale by orders of magnitude, split over 4 nodes (IID and Dirichlet(0.5)), node defaults;
a model trained centrally on all rows, 4 nodes averaging pairwise every 5 local steps, and each node
alone, with and without the ``Standardize`` input layer. Prints one line per table and variant:
central accuracy, and (worst gossiping node, worst node alone) per partition, on the test split.

    .venv/bin/python benchmarks/tabular_sim.py            # needs scikit-learn (the test extra)

A first look, before a benchmark with real nodes, more node counts and seeds: one run, the test split,
1,200 steps.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from torch import nn

from gossipfl.assembly import build_learner
from gossipfl.config import NodeConfig
from gossipfl.learning.partition import partition
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
    ap.add_argument("--data-seed", type=int, default=2026)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = args.steps // 5
    with tempfile.TemporaryDirectory() as tmp:
        for name, loader in TABLES.items():
            x, y = loader(return_X_y=True)
            path = Path(tmp) / f"{name}.npz"
            np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
            for variant in ("without Standardize", "with Standardize"):
                task = TabularTask(str(path))
                if variant == "without Standardize":
                    d, h, c = task.x.shape[1], task.hidden, task.classes
                    task.build_model = lambda d=d, h=h, c=c: nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))
                data = task.load_data(args.data_seed)
                cfg = NodeConfig(task="tabular", data_seed=args.data_seed)
                central = build_learner(task, data.train, data.test, cfg)
                central.train_steps(args.steps)
                row = {"central": round(central.evaluate().accuracy, 3)}
                for scheme in ("iid", "dirichlet:0.5"):
                    shards = partition(data.train.y, args.nodes, scheme, args.data_seed)
                    nodes, alone = (
                        [
                            build_learner(task, data.train.subset(s), data.test, replace(cfg, seed=i))
                            for i, s in enumerate(shards)
                        ]
                        for _ in range(2)
                    )
                    for a in alone:
                        a.train_steps(args.steps)
                    gossip(nodes, rounds, 5, random.Random(0))
                    worst = min(n.evaluate().accuracy for n in nodes)
                    row[scheme] = (round(worst, 3), round(min(a.evaluate().accuracy for a in alone), 3))
                print(f"{name:14} {variant:20} {row}", flush=True)


if __name__ == "__main__":
    main()

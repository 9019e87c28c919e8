"""Reference points for the node daemon benchmark: the same model and optimizer settings as a node,
trained (a) centrally on the whole training split and (b) on one node's 1/N shard alone, for the same
number of steps a node makes in the testbed run. Prints a markdown table; mean over seeds.

    .venv/bin/python benchmarks/baselines.py [--nodes 8] [--steps 1200] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch

from gossipfl.assembly import build_learner
from gossipfl.config import NodeConfig
from gossipfl.learning.partition import iid_partition
from gossipfl.learning.task import Dataset
from gossipfl.learning.tasks.digits import DigitsTask


def train_eval(train: Dataset, test: Dataset, seed: int, steps: int) -> float:
    learner = build_learner(DigitsTask(), train, test, replace(NodeConfig(), seed=seed, init_seed=seed))
    learner.train_steps(steps)
    return learner.evaluate().accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1200, help="a node makes ~20 steps/s: 1200 = 60 s")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = NodeConfig()
    data = DigitsTask().load_data(cfg.data_seed)
    shards = iid_partition(data.train.y, args.nodes, cfg.data_seed)
    central = [train_eval(data.train, data.test, s, args.steps) for s in range(args.seeds)]
    local = [
        train_eval(data.train.subset(shards[k]), data.test, s, args.steps)
        for s in range(args.seeds)
        for k in range(args.nodes)
    ]
    print(
        f"digits MLP, {cfg.optimizer} lr {cfg.lr} decay {cfg.lr_decay_steps:g}, batch {cfg.batch_size}, "
        f"{args.steps} steps, {args.seeds} seeds\n"
    )
    print("| training | test accuracy mean | min | max |\n|---|---|---|---|")
    print(
        f"| centralized, all {len(data.train)} images | {statistics.mean(central):.4f} | {min(central):.4f} "
        f"| {max(central):.4f} |"
    )
    print(
        f"| local only, 1/{args.nodes} shard ({len(shards[0])} images) | {statistics.mean(local):.4f} "
        f"| {min(local):.4f} | {max(local):.4f} |"
    )


if __name__ == "__main__":
    main()

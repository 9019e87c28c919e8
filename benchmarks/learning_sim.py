"""Round-based simulation of gossip learning with this package's learner and partitions (no network).

Each round every node makes ``--steps`` local minibatch steps, then every node, in random order,
averages with a uniformly random partner (push-pull, atomic). Prints one JSON line: mean and min test
accuracy of the nodes' models after the last exchange round, and the accuracy of the average of all
models (the consensus). Fast (seconds), so it is where training recipes were compared before running
the real testbed (`convergence.py`); it leaves out timing, asynchrony and the served-model rule.
``--allreduce`` replaces the pairwise exchanges by the exact mean of all models every round
(synchronous data-parallel SGD when ``--steps 1``), which separates what imperfect mixing costs from
what a large effective batch costs.

``--report-every R`` adds the curve (mean, min and consensus accuracy every R rounds); ``--eval-split
validation`` scores a hold-out of the training split instead of the test split, as nodes do.

    .venv/bin/python benchmarks/learning_sim.py --nodes 16 --scheme iid --steps 5 --rounds 1440 \
        --report-every 90 [--allreduce] [--seed S] >> runs.jsonl
    .venv/bin/python benchmarks/learning_sim.py --plot runs.jsonl OUT.png   # mean curves, per mode
    .venv/bin/python benchmarks/learning_sim.py --nodes 1 --scheme iid --steps 20 --rounds 1440  # centralized
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from gossipfl.learning.learner import Learner, build_seeded
from gossipfl.learning.partition import partition
from gossipfl.learning.task import Dataset, with_validation
from gossipfl.learning.tasks.digits import DigitsTask


def mean_params(nodes: list[Learner]) -> dict[str, np.ndarray]:
    """The mean of all nodes' parameters, name by name (the network's consensus model)."""
    params = [node.snapshot().params for node in nodes]
    return {k: np.mean([p[k] for p in params], axis=0) for k in params[0]}


def pairwise_round(nodes: list[Learner], rng: random.Random) -> None:
    """One exchange round: every node, in random order, averages with a uniformly random partner
    (push-pull, atomic; the older partner's age)."""
    order = list(range(len(nodes))) if len(nodes) > 1 else []
    rng.shuffle(order)
    for i in order:
        j = rng.choice([x for x in range(len(nodes)) if x != i])
        si, sj = nodes[i].snapshot(), nodes[j].snapshot()
        avg = {k: (si.params[k] + sj.params[k]) / 2 for k in si.params}
        age = max(si.age, sj.age)
        for node in (nodes[i], nodes[j]):
            node.update(lambda s, avg=avg, age=age: (avg, age, s.weight))


def plot(runs_file: str, out: str) -> None:
    """Accuracy against local steps from JSON lines with curves: the mean over runs per mode (pairwise or
    --allreduce), thin lines per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in open(runs_file) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, color in ((False, "C0"), (True, "C1")):
        curves = np.array([r["curve"] for r in runs if r["allreduce"] == mode])
        if not len(curves):
            continue
        steps = curves[0, :, 0] * runs[0]["steps"]
        label = "exact mean of all models (--allreduce)" if mode else "pairwise gossip"
        ax.plot(steps, curves[:, :, 1].mean(0), color=color, label=f"{label}, mean node, {len(curves)} runs")
        for c in curves:
            ax.plot(steps, c[:, 1], color=color, lw=0.5, alpha=0.4)
    r = runs[0]
    ax.set(xlabel="local steps per node", ylabel="accuracy", title=f"{r['nodes']} nodes, {r['scheme']}, "
           f"an exchange round every {r['steps']} local steps")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--scheme", default="dirichlet:0.5")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--lr-decay-steps", type=float, default=1000)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round")
    ap.add_argument("--rounds", type=int, default=360)
    ap.add_argument("--batch", type=int, default=32, help="minibatch size of every node")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-split", choices=("test", "validation"), default="test")
    ap.add_argument("--report-every", type=int, default=0, help="rounds between points of the curve (0: none)")
    ap.add_argument("--distinct-inits", action="store_true", help="each node its own initial model (default: one)")
    ap.add_argument(
        "--allreduce", action="store_true", help="every round all nodes take the exact mean (no gossip): data-parallel"
    )
    ap.add_argument("--plot", nargs=2, metavar=("RUNS_JSONL", "OUT_PNG"), help="only plot earlier runs' curves")
    a = ap.parse_args()
    if a.plot:
        plot(*a.plot)
        return
    torch.set_num_threads(1)
    task = DigitsTask()
    data = task.load_data(2026)
    if a.eval_split == "validation":
        data = with_validation(data, 2026)
    shards = partition(data.train.y, a.nodes, a.scheme, 2026)
    rng = random.Random(a.seed)
    nodes = [
        Learner(
            task,
            build_seeded(task.build_model, 1000 * a.seed + (k if a.distinct_inits else 0)),
            Dataset(data.train.x[idx], data.train.y[idx]),
            data.test,
            seed=1000 * a.seed + k,
            optimizer=a.optimizer,
            lr=a.lr,
            momentum=a.momentum,
            lr_decay_steps=a.lr_decay_steps,
            batch_size=a.batch,
        )
        for k, idx in enumerate(shards)
    ]
    curve = []
    for r in range(1, a.rounds + 1):
        for node in nodes:
            node.train_steps(a.steps)
        if a.allreduce:
            mean = mean_params(nodes)
            for node in nodes:
                node.update(lambda s, mean=mean: (mean, s.age, s.weight))
        else:
            pairwise_round(nodes, rng)
        if r == a.rounds or (a.report_every and r % a.report_every == 0):
            curve.append([r, *score(nodes)])
    _, mean_acc, min_acc, consensus = curve[-1]
    out = {**vars(a), "mean": mean_acc, "min": min_acc, "consensus": consensus}
    if a.report_every:
        out["curve"] = curve  # [round, mean, min, consensus]
    print(json.dumps(out))


def score(nodes: list[Learner]) -> tuple[float, float, float]:
    """Mean and min accuracy of the nodes' models, and the accuracy of their mean (the consensus): node 0
    is given the mean, scored, and given its own parameters back (its merge and version counters move,
    which nothing here reads; its optimizer state and minibatch order do not)."""
    accs = [node.evaluate_working().accuracy for node in nodes]
    mean = mean_params(nodes)
    scratch = nodes[0]
    before = scratch.snapshot()
    scratch.update(lambda s: (mean, s.age, s.weight))
    consensus = scratch.evaluate_working().accuracy
    scratch.update(lambda s: (before.params, before.age, before.weight))
    return round(float(np.mean(accs)), 4), round(float(min(accs)), 4), round(float(consensus), 4)


if __name__ == "__main__":
    main()

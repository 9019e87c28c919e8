"""Privacy (issue 17): accuracy against spent epsilon under DP-SGD, and secure group averaging.

Part ``dp`` (rounds, no network; the nodes' own learners, built by ``assembly.build_learner`` from
``NodeConfig`` with the ``--dp-*`` options, so the DP-SGD engine and the accountant are the node's):
16 nodes on ``digits``, IID and Dirichlet(0.5) shards. Every round each node makes ``--local-steps``
DP-SGD steps (Poisson-sampled batches, per-sample clipping at ``--clip``, Gaussian noise) and then every
node, in random order, averages with a random partner (push-pull, as a node does). The noise multiplier
of each epsilon is derived for the planned steps (``--dp-target-epsilon EPS --dp-steps T``, delta 1e-5):
each node spends exactly its budget on its own records. Next to it, for the same steps:
- gossip without privacy (the same rounds, no clipping, no noise);
- every node alone without privacy (its shard only): the table gives the best node, the goal's bar;
- centralized DP-SGD on the union of the data at the same epsilon and delta (the same engine, one model,
  batches of N x the node batch: the same records per step as the whole network, so the same sampling
  rate and noise multiplier per step).

Part ``group`` (real nodes in one process, HTTP on loopback, a cluster key): pure averaging
(``--no-train``) with ``--secure-group 3`` and ``4`` against pairwise push-pull: how much each cuts the
variance of the models per gossip interval and per round, bytes and wall time per round; then ``digits``
accuracy with ``--secure-group 3`` against plain gossip, 8 nodes, the same seeds.

    .venv/bin/python benchmarks/privacy.py --part dp [--epsilons 1 2 4 8] [--schemes iid dirichlet:0.5]
    .venv/bin/python benchmarks/privacy.py --part group [--group-nodes 8] [--duration 40]
    .venv/bin/python benchmarks/privacy.py --plot     # the plot from benchmarks/results/privacy.json

Writes benchmarks/results/privacy.json (raw numbers), privacy.md (tables) and privacy.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from learning_sim import pairwise_round, score  # noqa: E402

from gossipfl.assembly import build_learner  # noqa: E402
from gossipfl.config import NodeConfig  # noqa: E402
from gossipfl.learning.learner import Learner  # noqa: E402
from gossipfl.learning.partition import partition  # noqa: E402
from gossipfl.learning.task import Dataset  # noqa: E402
from gossipfl.learning.tasks.digits import DigitsTask  # noqa: E402
from gossipfl.protocol.consensus import consensus_distance, flatten, network_mean  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA_SEED = 2026


# ---- part dp ----------------------------------------------------------------------------------------
def recipe(a: argparse.Namespace, **dp: object) -> NodeConfig:
    """The nodes' recipe for this benchmark: NodeConfig defaults but batch, step size and DP options."""
    base = replace(NodeConfig(), batch_size=a.batch, lr=a.lr, lr_decay_steps=a.lr_decay_steps, init_seed=0)
    return replace(base, **dp) if dp else base


def dp_options(a: argparse.Namespace, eps: float | None) -> dict:
    if eps is None:
        return {}
    return {"dp_target_epsilon": eps, "dp_steps": a.steps, "dp_delta": a.delta, "dp_max_grad_norm": a.clip}


def privacy_of(learner: Learner) -> dict:
    p = learner.privacy
    return {} if p is None else p.describe()


def gossip_cell(a: argparse.Namespace, scheme: str, eps: float | None, seed: int) -> dict:
    """16 (--nodes) learners, rounds of local steps then pairwise averaging, for --steps steps each."""
    task = DigitsTask()
    data = task.load_data(DATA_SEED)
    shards = partition(data.train.y, a.nodes, scheme, DATA_SEED)
    cfg = recipe(a, **dp_options(a, eps))
    learners = [
        build_learner(
            task, Dataset(data.train.x[idx], data.train.y[idx]), data.test, replace(cfg, seed=1000 * seed + k)
        )
        for k, idx in enumerate(shards)
    ]
    rng = random.Random(seed)
    t0 = time.monotonic()
    curve = []
    rounds = a.steps // a.local_steps
    for r in range(1, rounds + 1):
        for node in learners:
            node.train_steps(a.local_steps)
        pairwise_round(learners, rng)
        if r == rounds or r % max(1, rounds // 6) == 0:
            curve.append([r * a.local_steps, *score(learners)])
    mean, low, consensus = curve[-1][1:]
    priv = privacy_of(learners[0])
    return {
        "kind": "gossip-dp" if eps is not None else "gossip",
        "scheme": scheme,
        "epsilon_target": eps,
        "seed": seed,
        "mean": mean,
        "min": low,
        "consensus": consensus,
        "steps": [node.steps for node in learners],
        "epsilon_spent": max((privacy_of(node).get("epsilon") or 0.0) for node in learners) if eps else None,
        "privacy": priv,
        "curve": curve,
        "seconds": round(time.monotonic() - t0, 1),
    }


def alone_cell(a: argparse.Namespace, scheme: str, seed: int) -> dict:
    """Every node on its own shard, no privacy, the same steps: mean and best node."""
    task = DigitsTask()
    data = task.load_data(DATA_SEED)
    shards = partition(data.train.y, a.nodes, scheme, DATA_SEED)
    cfg = recipe(a)
    accs = []
    for k, idx in enumerate(shards):
        learner = build_learner(
            task, Dataset(data.train.x[idx], data.train.y[idx]), data.test, replace(cfg, seed=1000 * seed + k)
        )
        learner.train_steps(a.steps)
        accs.append(learner.evaluate_working().accuracy)
    return {"kind": "alone", "scheme": scheme, "seed": seed, "mean": float(np.mean(accs)), "best": max(accs),
            "accuracies": accs}  # fmt: skip


def central_cell(a: argparse.Namespace, eps: float, seed: int) -> dict:
    """One model on the union, DP-SGD at the same epsilon and delta, batches of N x the node batch."""
    task = DigitsTask()
    data = task.load_data(DATA_SEED)
    cfg = replace(recipe(a, **dp_options(a, eps)), batch_size=a.batch * a.nodes, seed=seed)
    learner = build_learner(task, data.train, data.test, cfg)
    learner.train_steps(a.steps)
    return {"kind": "central-dp", "epsilon_target": eps, "seed": seed,
            "accuracy": learner.evaluate_working().accuracy, "privacy": privacy_of(learner)}  # fmt: skip


def part_dp(a: argparse.Namespace) -> list[dict]:
    """The sweep at --nodes over --schemes and --epsilons, then each of --more-nodes at --more-epsilons on
    IID shards (more records per node); every row carries its network size."""
    plan = [(a.nodes, a.schemes, a.epsilons)] + [(n, ["iid"], a.more_epsilons) for n in a.more_nodes]
    rows = []
    for seed in range(a.seeds):
        for nodes, schemes, epsilons in plan:
            b = argparse.Namespace(**{**vars(a), "nodes": nodes})
            cells = [lambda b=b, s=seed, eps=eps: central_cell(b, eps, s) for eps in epsilons]
            for scheme in schemes:
                cells += [lambda b=b, s=seed, scheme=scheme: alone_cell(b, scheme, s)]
                cells += [lambda b=b, s=seed, scheme=scheme: gossip_cell(b, scheme, None, s)]
                cells += [lambda b=b, s=seed, sc=scheme, e=eps: gossip_cell(b, sc, e, s) for eps in epsilons]
            for cell in cells:
                row = {"nodes": nodes, **cell()}
                print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "privacy", "accuracies")}),
                      flush=True)  # fmt: skip
                rows.append(row)
    return rows


def dp_table(rows: list[dict], a: argparse.Namespace) -> str:
    def avg(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f}" if values else "-"

    lines = []
    for nodes in sorted({r["nodes"] for r in rows}, reverse=True):
        here = [r for r in rows if r["nodes"] == nodes]
        epsilons = sorted({r["epsilon_target"] for r in here if r["kind"] == "gossip-dp"})
        central = {e: [r["accuracy"] for r in here if r["kind"] == "central-dp" and r["epsilon_target"] == e]
                   for e in epsilons}  # fmt: skip
        for scheme in sorted({r["scheme"] for r in here if "scheme" in r}, key=lambda s: s != "iid"):
            alone = [r for r in here if r["kind"] == "alone" and r["scheme"] == scheme]
            plain = [r for r in here if r["kind"] == "gossip" and r["scheme"] == scheme]
            best_alone = max(r["best"] for r in alone) if alone else float("nan")
            lines += [
                f"\n**{nodes} nodes, {scheme}** (about {1437 // nodes} training images per node; every node alone"
                f" without privacy: mean {avg([r['mean'] for r in alone])}, best node {best_alone:.4f};"
                f" gossip without privacy: mean {avg([r['mean'] for r in plain])},"
                f" consensus {avg([r['consensus'] for r in plain])})\n",
                "| epsilon (target) | spent | noise multiplier | gossip DP: mean node | min node | consensus |"
                " centralized DP-SGD | mean node - central | mean node - best alone |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for eps in epsilons:
                cells = [
                    r for r in here if r["kind"] == "gossip-dp" and r["scheme"] == scheme and r["epsilon_target"] == eps
                ]
                if not cells:
                    continue
                mean_node = statistics.mean(r["mean"] for r in cells)
                c = statistics.mean(central[eps]) if central[eps] else float("nan")
                sigma = cells[0]["privacy"].get("noise_multiplier")
                lines.append(
                    f"| {eps:g} | {max(r['epsilon_spent'] for r in cells):.3f} | {sigma:.3f} | {mean_node:.4f} |"
                    f" {avg([r['min'] for r in cells])} | {avg([r['consensus'] for r in cells])} | {c:.4f} |"
                    f" {100 * (mean_node - c):+.1f} pt | {100 * (mean_node - best_alone):+.1f} pt |"
                )
    return "\n".join(lines)


# ---- part group -------------------------------------------------------------------------------------
def group_config(i: int, k: int, key: Path, seeds: tuple[str, ...], **extra: object) -> NodeConfig:
    """Node i of the group part: loopback, static seeds plus peer exchange, the cluster key, K (0: pairwise)."""
    return NodeConfig(host="127.0.0.1", port=0, id=f"g{i}", seed=i, discovery=("static",), seeds=seeds,
                      mdns_interface=("127.0.0.1",), pex_interval=0.5, secret_file=str(key),
                      secure_group=k, cluster=f"privacy-{k}", join_wait=0,
                      read_token="privacy-benchmark", **extra)  # fmt: skip


def flat(node: object) -> np.ndarray:
    return flatten(node.learner.snapshot().params)  # type: ignore[attr-defined]


async def group_run(n: int, k: int, key: Path, seconds: float, train: bool) -> dict:
    """N nodes in this process; until every node knows the N-1 others, then ``seconds`` of gossip: the
    models' spread over time (pure averaging) or the final accuracy (training), and per-round numbers."""
    from gossipfl.node import Node

    extra = {} if train else {"no_train": True, "eval_interval": 60.0}
    first = Node(group_config(0, k, key, (), **extra))
    await first.start()
    rest = [Node(group_config(i, k, key, (f"127.0.0.1:{first.port}",), **extra)) for i in range(1, n)]
    await asyncio.gather(*(node.start() for node in rest))
    nodes = [first, *rest]
    rounds: list[tuple[str, float]] = []
    try:
        deadline = time.monotonic() + 30
        while min(len(node.peers) for node in nodes) < n - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for node in nodes:
            if node.group is not None:
                node.group.on_round = lambda outcome, s: rounds.append((outcome, s))
        before = [(node.group or node.gossiper).stats.as_dict() for node in nodes]
        start, samples = time.monotonic(), []
        mean0 = network_mean([flat(node) for node in nodes])
        while time.monotonic() - start < seconds:
            samples.append((time.monotonic() - start, consensus_distance([flat(node) for node in nodes]) ** 2))
            if samples[-1][1] < samples[0][1] * 1e-12:
                break
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - start
        after = [(node.group or node.gossiper).stats.as_dict() for node in nodes]
        drift = float(np.abs(network_mean([flat(node) for node in nodes]) - mean0).max())
        accs = [node.learner.evaluate().accuracy for node in nodes] if train else []
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))
    done = [key for key in ("committed", "ok") if key in after[0]][0]
    count = sum(a[done] - b[done] for a, b in zip(after, before, strict=True))
    sent = sum(a["bytes_sent"] - b["bytes_sent"] for a, b in zip(after, before, strict=True))
    out = {"nodes": n, "group": k, "seconds": round(elapsed, 1), "rounds": count,
           "rounds_per_s": round(count / elapsed, 2), "bytes_sent_per_round": round(sent / max(count, 1)),
           "mean_drift_max": drift}  # fmt: skip
    if k:
        out["aborted"] = sum(a["aborted"] - b["aborted"] for a, b in zip(after, before, strict=True))
        ok = [s for outcome, s in rounds if outcome == "committed"]
        if ok:
            out["round_ms_median"] = round(1000 * statistics.median(ok), 2)
    if train:
        out["accuracy_mean"], out["accuracy_min"] = float(np.mean(accs)), float(min(accs))
    else:  # variance per 0.25 s interval and per round, fitted over the part above 1e-10 of the start
        pts = [(t, v) for t, v in samples if v > samples[0][1] * 1e-10]
        if len(pts) > 2:  # else: consensus within the first samples (K = N averages everything at once)
            slope = np.polyfit([t for t, _ in pts], [np.log(v) for _, v in pts], 1)[0]
            out["variance_cut_per_interval"] = float(np.exp(-slope * 0.25))
            out["variance_cut_per_round"] = float(np.exp(-slope * elapsed / max(count, 1)))
    return out


def part_group(a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "cluster.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        for k in (0, 3, 4):  # 0: pairwise push-pull
            rows.append(
                {"kind": "averaging", **asyncio.run(group_run(a.group_nodes, k, key, a.averaging_duration, False))}
            )
            print(json.dumps(rows[-1]), flush=True)
        for k in (0, 3):
            rows.append({"kind": "training", **asyncio.run(group_run(a.group_nodes, k, key, a.duration, True))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def cut(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}x" if key in row else "at once"


def group_table(rows: list[dict]) -> str:
    lines = [
        "| mode | variance cut per 0.25 s | per round | rounds/s (network) | aborted | bytes sent per round"
        " | ms per round (median) | network mean drift |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "averaging"):
        name = f"secure group K={r['group']}" if r["group"] else "pairwise push-pull"
        lines.append(
            f"| {name} | {cut(r, 'variance_cut_per_interval', 2)} | {cut(r, 'variance_cut_per_round', 3)} |"
            f" {r['rounds_per_s']} | {r.get('aborted', '-')} | {r['bytes_sent_per_round']} |"
            f" {r.get('round_ms_median', '-')} | {r['mean_drift_max']:.1e} |"
        )
    lines += ["", "| training (digits) | accuracy mean | min | rounds |", "|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "training"):
        name = f"secure group K={r['group']}" if r["group"] else "plain gossip (pairwise)"
        lines.append(f"| {name} | {r['accuracy_mean']:.4f} | {r['accuracy_min']:.4f} | {r['rounds']} |")
    return "\n".join(lines)


# ---- output ----------------------------------------------------------------------------------------
def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = argparse.Namespace(**doc["dp_args"])
    rows = [r for r in doc["dp"] if r.get("nodes", a.nodes) == a.nodes]
    fig, axes = plt.subplots(1, len(a.schemes), figsize=(6 * len(a.schemes), 4.2), squeeze=False)
    for ax, scheme in zip(axes[0], a.schemes, strict=True):
        cells = sorted((r for r in rows if r["kind"] == "gossip-dp" and r["scheme"] == scheme),
                       key=lambda r: r["epsilon_target"])  # fmt: skip
        eps = sorted({r["epsilon_target"] for r in cells})
        ax.plot(eps, [statistics.mean(r["mean"] for r in cells if r["epsilon_target"] == e) for e in eps], "o-",
                label="gossip DP-SGD, mean node")  # fmt: skip
        ax.plot(eps, [statistics.mean(r["consensus"] for r in cells if r["epsilon_target"] == e) for e in eps], "s--",
                label="gossip DP-SGD, consensus")  # fmt: skip
        central = [r for r in rows if r["kind"] == "central-dp"]
        ax.plot(eps, [statistics.mean(r["accuracy"] for r in central if r["epsilon_target"] == e) for e in eps], "^-",
                label="centralized DP-SGD")  # fmt: skip
        for kind, key, style, label in (("gossip", "mean", ":", "gossip, no privacy"),
                                        ("alone", "best", "-.", "best node alone, no privacy")):  # fmt: skip
            vals = [r[key] for r in rows if r["kind"] == kind and r["scheme"] == scheme]
            if vals:
                ax.axhline(statistics.mean(vals), linestyle=style, color="grey", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits, {a.nodes} nodes, {scheme}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(doc: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "privacy.json").write_text(json.dumps(doc, indent=1))
    text = [f"# Privacy: DP-SGD and secure group averaging\n\nRun {doc['when']} on {doc['host']}; commands:"]
    text += [f"`{c}`" for c in doc["commands"]]
    if doc.get("dp"):
        a = argparse.Namespace(**doc["dp_args"])
        text += [
            f"\n## Accuracy against epsilon (delta {a.delta:g})\n",
            f"digits MLP, batch {a.batch} per node (Poisson sampling), clip {a.clip}, lr {a.lr}, {a.steps} steps"
            f" per node ({a.local_steps} between exchange rounds), {a.seeds} seed(s); centralized: batch"
            " N x that, the same steps.",
            dp_table(doc["dp"], a),
        ]
    if doc.get("group"):
        a = argparse.Namespace(**doc["group_args"])
        text += [f"\n## Secure group averaging ({a.group_nodes} nodes, a cluster key)\n", group_table(doc["group"])]
    (RESULTS / "privacy.md").write_text("\n".join(text) + "\n")
    if doc.get("dp"):
        plot(doc, RESULTS / "privacy.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("dp", "group", "all"), default="all")
    ap.add_argument("--plot", action="store_true", help="only redo the tables and plot from privacy.json")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--schemes", nargs="+", default=["iid", "dirichlet:0.5"])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4, 8])
    ap.add_argument("--more-nodes", nargs="*", type=int, default=[4, 8], help="smaller networks, IID only")
    ap.add_argument("--more-epsilons", nargs="+", type=float, default=[8])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=200, help="DP-SGD steps per node (the planned T)")
    ap.add_argument("--local-steps", type=int, default=1, help="steps between exchange rounds")
    ap.add_argument("--batch", type=int, default=32, help="expected batch per node (sampling rate batch/n)")
    ap.add_argument("--clip", type=float, default=1.0, help="per-sample gradient norm bound C")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lr-decay-steps", type=float, default=0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--group-nodes", type=int, default=8)
    ap.add_argument("--duration", type=float, default=40, help="group part: training seconds")
    ap.add_argument("--averaging-duration", type=float, default=15, help="group part: --no-train seconds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    path = RESULTS / "privacy.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if a.plot:
        write(doc)
        return
    command = "python benchmarks/privacy.py " + " ".join(sys.argv[1:])
    doc.update(
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=f"{platform.node()} ({os.cpu_count()} cores)"
    )
    doc["commands"] = sorted(set(doc.get("commands", [])) | {command})
    if a.part in ("dp", "all"):
        doc["dp"], doc["dp_args"] = part_dp(a), vars(a)
    if a.part in ("group", "all"):
        doc["group"], doc["group_args"] = part_group(a), vars(a)
    write(doc)
    print((RESULTS / "privacy.md").read_text())


if __name__ == "__main__":
    main()

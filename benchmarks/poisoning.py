"""Poisoning: honest nodes' accuracy with two attacking members, without a defence and with --clip-radius auto.

16 honest nodes train `digits` on Dirichlet(0.5) shards; 2 attackers (members: they hold the cluster's key, so
authentication does not stop them) answer and start exchanges with a corrupted copy of their model:

- scale: the parameters times 100
- flip: the parameters times -1
- noise: Gaussian noise, standard deviation 1, instead of the parameters
- shift: "a little is enough" (Baruch et al. 2019): the model plus a small, consistent shift in one direction
  (the same fixed unit direction on both attackers, norm `--shift` times the median honest distance measured
  by the attacker itself), small enough to pass any distance check

The attackers keep merging what they receive unclipped, so their own model follows the honest ones and each
corrupted copy is built from an up-to-date base. Every node runs in this process on one event loop (the
in-process testbed's arrangement), with mDNS on loopback; the attackers are ordinary nodes whose outgoing
messages are rewritten here: no attacker code lives in the package.

    python benchmarks/poisoning.py --duration 60 --seeds 0
    python benchmarks/poisoning.py --attacks none scale --defences off auto --duration 30   # a subset

Writes benchmarks/results/poisoning.{json,md,png}: per (attack, defence, seed) the honest nodes' mean and worst
accuracy at the end, and the accuracy curves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from gossipfl.config import NodeConfig
from gossipfl.node import Node
from gossipfl.protocol.robust import distance

RESULTS = Path(__file__).parent / "results"
ATTACKS = ("none", "scale", "flip", "noise", "shift")
LOOPBACK = "127.0.0.1"


def corrupt(attack: str, params: dict[str, np.ndarray], state: dict) -> dict[str, np.ndarray]:
    """The attacker's outgoing copy of ``params``."""
    floats = [k for k in sorted(params) if params[k].dtype.kind == "f"]
    out = dict(params)
    if attack == "scale":
        for k in floats:
            out[k] = params[k] * 100
    elif attack == "flip":
        for k in floats:
            out[k] = -params[k]
    elif attack == "noise":
        rng = state["rng"]
        for k in floats:
            out[k] = rng.normal(0.0, 1.0, params[k].shape).astype(params[k].dtype)
    elif attack == "shift":
        direction = state["direction"]  # one unit vector over all float parameters, fixed for the run
        size = state["shift"] * (statistics.median(state["distances"]) if state["distances"] else 0.1)
        offset = 0
        for k in floats:
            n = params[k].size
            out[k] = (params[k] + size * direction[offset : offset + n].reshape(params[k].shape)).astype(
                params[k].dtype
            )
            offset += n
    return out


def make_attacker(node: Node, attack: str, shift: float, seed: int) -> None:
    """Rewrite what ``node`` sends (as initiator and as responder) and record the distances it sees."""
    gossiper = node.gossiper
    params = node.learner.snapshot().params
    total = sum(v.size for k, v in params.items() if v.dtype.kind == "f")
    direction = np.random.default_rng(12345).normal(size=total)  # the same direction on every attacker
    state = {
        "rng": np.random.default_rng(seed),
        "direction": direction / np.linalg.norm(direction),
        "shift": shift,
        "distances": [],
    }
    honest_outgoing = gossiper.outgoing
    honest_merge = gossiper._merge

    def outgoing(self, snap, xid, codec, at=None):  # noqa: ANN001, ANN202
        class Corrupted:
            params = corrupt(attack, dict(snap.params), state)
            age, version, weight, merges = snap.age, snap.version, snap.weight, snap.merges

        return honest_outgoing(Corrupted(), xid, codec, at)

    def merge_and_measure(self, mine, theirs):  # noqa: ANN001, ANN202
        state["distances"] = (state["distances"] + [distance(mine.params, theirs.params)])[-64:]
        return honest_merge(mine, theirs)

    gossiper.outgoing = types.MethodType(outgoing, gossiper)
    gossiper._merge = types.MethodType(merge_and_measure, gossiper)


async def run(attack: str, defence: str, seed: int, args: argparse.Namespace) -> dict:
    cluster = f"poison-{uuid.uuid4().hex[:8]}"
    common = dict(
        host=LOOPBACK,
        port=0,
        mdns_interface=(LOOPBACK,),
        discovery=("mdns",),
        cluster=cluster,
        partition_scheme="dirichlet:0.5",
        eval_interval=2.0,
        clip_radius=None if defence == "off" else defence.split("@")[0],
        clip_quantile=float(defence.split("@")[1]) if "@" in defence else 0.5,
    )
    n, a = args.honest, (0 if attack == "none" else args.attackers)
    configs = [NodeConfig(id=f"h{i:02d}", partition=f"{i}/{n}", seed=seed + i, **common) for i in range(n)]
    # attackers hold a copy of an honest shard (the cluster's split must agree): they train like members, and
    # corrupt what they send
    configs += [
        NodeConfig(
            id=f"x{j}",
            partition=f"{j % n}/{n}",
            seed=seed + 100 + j,
            **{**common, "clip_radius": None, "clip_quantile": 0.5},
        )
        for j in range(a)
    ]
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=args.workers))
    zc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    nodes = [Node(c, zeroconf=zc) for c in configs]
    curve: list[list[float]] = []
    try:
        await asyncio.gather(*(x.start() for x in nodes))
        honest, attackers = nodes[:n], nodes[n:]
        for j, x in enumerate(attackers):
            make_attacker(x, attack, args.shift, seed + 1000 + j)
        start = time.monotonic()
        while (t := time.monotonic() - start) < args.duration:
            await asyncio.sleep(args.sample)
            accs = [x.last_eval.accuracy if x.last_eval else 0.0 for x in honest]
            curve.append([round(t, 1), round(float(np.mean(accs)), 4), round(float(np.min(accs)), 4)])
        await asyncio.gather(*(x._evaluate() for x in honest))
        accs = [x.last_eval.accuracy for x in honest]
        clipped = sum(x.gossiper.robust.clipped for x in honest if x.gossiper.robust)
        refused = sum(x.gossiper.robust.refused for x in honest if x.gossiper.robust)
        exchanges = sum(x.gossiper.stats.ok + x.gossiper.stats.served for x in honest)
    finally:
        await asyncio.gather(*(x.stop() for x in nodes), return_exceptions=True)
        await zc.async_close()
    return {
        "attack": attack,
        "defence": defence,
        "seed": seed,
        "mean": float(np.mean(accs)),
        "worst": float(np.min(accs)),
        "clipped": clipped,
        "refused": refused,
        "honest_exchanges": exchanges,
        "curve": curve,
    }


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["attack"], r["defence"]), []).append(r)
    lines = [
        "| attack | defence | honest mean | honest worst | runs | received models clipped / refused |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (attack, defence), rs in by.items():
        mean = statistics.mean(r["mean"] for r in rs)
        worst = statistics.mean(r["worst"] for r in rs)
        lines.append(
            f"| {attack} | {defence} | {mean:.4f} | {worst:.4f} | {len(rs)} | "
            f"{sum(r['clipped'] for r in rs)} / {sum(r['refused'] for r in rs)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.4), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for r in rows:
            if r["attack"] != attack:
                continue
            c = np.array(r["curve"])
            style = "-" if r["defence"] != "off" else "--"
            ax.plot(c[:, 0], c[:, 1], style, label=f"{r['defence']} mean (seed {r['seed']})")
            ax.plot(c[:, 0], c[:, 2], style, alpha=0.4, label=f"{r['defence']} worst")
        ax.set_title(f"attack: {attack}")
        ax.set_xlabel("seconds")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("honest nodes' test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument(
        "--defences",
        nargs="+",
        default=["off", "auto"],
        help="off, auto, auto@Q (--clip-quantile Q), or a fixed radius",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--honest", type=int, default=16)
    ap.add_argument("--attackers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--sample", type=float, default=2.0)
    ap.add_argument("--shift", type=float, default=1.0, help="shift attack: norm in median honest distances")
    ap.add_argument("--workers", type=int, default=4, help="threads for the nodes' training and merges")
    ap.add_argument("--name", default="poisoning")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.ERROR)
    rows = []
    for seed in args.seeds:
        for attack in args.attacks:
            for defence in args.defences:
                r = asyncio.run(run(attack, defence, seed, args))
                rows.append(r)
                print(
                    f"{attack:>6} {defence:>5} seed {seed}: honest mean {r['mean']:.4f} worst {r['worst']:.4f} "
                    f"clipped {r['clipped']} refused {r['refused']}",
                    flush=True,
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "runs": rows}) + "\n")
    md = table(rows)
    (RESULTS / f"{args.name}.md").write_text(
        f"# {args.name}\n\n`python benchmarks/poisoning.py {' '.join(__import__('sys').argv[1:])}`\n\n{md}\n"
    )
    plot(rows, RESULTS / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()

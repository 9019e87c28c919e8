"""How often to exchange: 16 node processes on label-skewed `digits`, one testbed run per gossip
interval and seed, every node's accuracy at the end, curves against time and bytes, and what each
cadence costs in bytes.

The testbed runs as a user would run it (`gossipfl testbed --nodes 16 --duration 90 --seed S
--gossip-interval G -- --partition-scheme dirichlet:0.5`: one process per node, forked from a
zygote, real HTTP and mDNS on loopback). With `--eval-split validation` (the default here) the nodes
score a hold-out of the training split, which is where the default interval was chosen; run it once
with `--eval-split test` for the numbers that are reported.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/cadence.py [--intervals 1 0.5 0.25] [--seeds 11 12] [--eval-split validation]
        [--nodes 16] [--duration 90] [--scheme dirichlet:0.5] [--reuse] [--name cadence-validation]

Writes benchmarks/results/NAME.md (table), NAME.png (accuracy against time and MB sent) and NAME.json
(compact raw numbers: per run, every node's final accuracy, steps and bytes, and the mean/min
curve); the testbed's own results.json files go to benchmarks/results/cadence/ (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from runstats import compact_curve, half_width95  # noqa: E402

from gossipfl.testbed import TestbedOptions, run_testbed  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(interval: float, seed: int, args: argparse.Namespace) -> dict:
    out = RESULTS / "cadence" / f"{args.eval_split}-n{args.nodes}-{args.scheme.replace(':', '')}-gi{interval:g}-s{seed}"
    found = out / "results.json"
    earlier = json.loads(found.read_text())["options"] if args.reuse and found.exists() else None
    if earlier is None or (earlier["duration"], earlier["nodes"]) != (args.duration, args.nodes):
        opts = TestbedOptions(
            nodes=args.nodes, duration=args.duration, out=str(out), live=False, seed=seed, gossip_interval=interval,
            extra_node_args=("--partition-scheme", args.scheme, "--eval-split", args.eval_split),
        )  # fmt: skip
        if asyncio.run(run_testbed(opts)) != 0:
            raise SystemExit(f"testbed failed: interval {interval:g}, seed {seed}")
    res = json.loads(found.read_text())
    nodes = list(res["nodes"].values())
    finals = list(res["final"].values())
    ex = [f["exchanges"] for f in finals]
    # bytes sent during the measured duration (the series starts once all nodes know each other; the
    # final counters also hold the start-up, while nodes already gossip)
    sent = [v["bytes_sent"][-1][1] - v["bytes_sent"][0][1] for v in nodes]
    span = statistics.mean(v["bytes_sent"][-1][0] - v["bytes_sent"][0][0] for v in nodes)
    return {
        "interval": interval,
        "seed": seed,
        "eval_split": args.eval_split,
        "accuracy": [round(f["accuracy"], 4) for f in finals],
        "steps": [f["steps"] for f in finals],
        "bytes_sent": [e["bytes_sent"] for e in ex],  # since the node started
        "bytes_received": [e["bytes_received"] for e in ex],
        "sent_per_min": round(statistics.mean(sent) / span * 60),  # per node, over the measured duration
        "pace_s": [e.get("pace_s") for e in ex],  # at the end (runs before pacing existed: None)
        "started": {k: sum(e[k] for e in ex) for k in ("ok", "failed", "busy", "aborted")},
        "wall_s": res["resources"]["wall_s"],
        "startup_s": res["summary"]["startup_s"],
        "duration_s": res["options"]["duration"],
        "curve": compact_curve(res),  # [seconds, mean accuracy, min accuracy, mean MB sent per node]
    }


def ci(values: list[float]) -> str:
    """Mean ± the 95% t-interval half-width, in points (just the mean for one run)."""
    mean = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * half_width95(values):.1f}"


def table(runs: list[dict]) -> str:
    lines = [
        "| interval (s) | runs | worst node per run | worst node (95% CI) | spread per run | mean node | "
        "MB sent per node per minute (about as much received) | pace at the end (s, median node) "
        "| exchanges started: busy (409) / aborted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for interval in sorted({r["interval"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["interval"] == interval]
        worst = [min(r["accuracy"]) for r in rs]
        spread = [max(r["accuracy"]) - min(r["accuracy"]) for r in rs]
        mean = [statistics.mean(r["accuracy"]) for r in rs]
        per_min = [r["sent_per_min"] / 1e6 for r in rs]
        paces = [p for r in rs for p in r["pace_s"] if p is not None]
        pace = f"{statistics.median(paces):.3g}" if paces else "-"
        started = sum(sum(r["started"].values()) for r in rs)
        busy = sum(r["started"]["busy"] for r in rs) / started, sum(r["started"]["aborted"] for r in rs) / started
        lines.append(
            f"| {interval:g} | {len(rs)} | {', '.join(f'{w:.4f}' for w in worst)} | {ci(worst)} "
            f"| {', '.join(f'{s:.4f}' for s in spread)} | {ci(mean)} | {statistics.mean(per_min):.1f} "
            f"| {pace} | {busy[0]:.1%} / {busy[1]:.1%} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = sorted({r["interval"] for r in runs}, reverse=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in runs:
        c = np.array(r["curve"])
        color = f"C{intervals.index(r['interval'])}"
        first = r["seed"] == min(x["seed"] for x in runs if x["interval"] == r["interval"])
        left.plot(c[:, 0], c[:, 2], color=color, lw=1, label=f"every {r['interval']:g} s" if first else None)
        right.plot(c[:, 3], c[:, 2], color=color, lw=1)
    left.set(
        xlabel="seconds", ylabel=f"worst node's accuracy ({runs[0]['eval_split']}), one line per run", ylim=(0.8, 1)
    )
    right.set(xlabel="MB sent per node", ylabel="worst node's accuracy", ylim=(0.8, 1), xscale="log")
    left.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12], help="testbed seeds: node i gets seed S+i")
    ap.add_argument("--eval-split", default="validation", choices=("validation", "test"))
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--scheme", default="dirichlet:0.5")
    ap.add_argument("--reuse", action="store_true", help="take a run's earlier results.json if there is one")
    ap.add_argument("--name", default=None, help="default: cadence-EVAL_SPLIT")
    args = ap.parse_args()
    name = args.name or f"cadence-{args.eval_split}"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    for seed in args.seeds:  # seeds outside, so slow drifts of the machine hit every interval alike
        for interval in args.intervals:
            r = run(interval, seed, args)
            runs.append(r)
            print(f"interval {interval:g} seed {seed}: worst {min(r['accuracy']):.4f}, "
                  f"mean {statistics.mean(r['accuracy']):.4f}", flush=True)  # fmt: skip
    command = (
        f"python benchmarks/cadence.py --intervals {' '.join(f'{i:g}' for i in args.intervals)} "
        f"--seeds {' '.join(map(str, args.seeds))} --eval-split {args.eval_split}"
        + (f" --nodes {args.nodes}" if args.nodes != 16 else "")
        + (f" --duration {args.duration:g}" if args.duration != 90 else "")
        + (f" --scheme {args.scheme}" if args.scheme != "dirichlet:0.5" else "")
        + (" --reuse" if args.reuse else "")
        + (f" --name {args.name}" if args.name else "")
    )
    report = f"""# Exchange cadence on label-skewed data: {args.nodes} node processes, {args.scheme}

{"Assembled" if args.reuse else "Run"} {started} on {platform.node()}\
 ({platform.machine()}, Python {platform.python_version()}): `{command}`

`gossipfl testbed --nodes {args.nodes} --duration {args.duration:g} --seed S --gossip-interval G -- \
--partition-scheme {args.scheme} --eval-split {args.eval_split}`: one process per node, node defaults \
otherwise, accuracy on the {args.eval_split} split at the end of the {args.duration:g} s. The runs differ \
in the nodes' seeds (minibatch order, choice of peers) and in thread timing; they share the data split, \
the partition and the initial model (`--data-seed`, the default), so the 95% CI (t-interval over runs, \
wide with few runs) covers that variation only. Bytes: exchange bodies a node sent during the measured \
duration, mean over nodes. Raw numbers: [{name}.json]({name}.json).

{table(runs)}

![worst node's accuracy against time and MB sent]({name}.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(report)
    (RESULTS / f"{name}.json").write_text(json.dumps(runs, separators=(",", ":")) + "\n")
    plot(runs, RESULTS / f"{name}.png")
    print(report)


if __name__ == "__main__":
    main()

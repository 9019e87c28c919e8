"""Compression of exchanges: bytes per node and final accuracy on `digits`, 16 nodes, for each --compress mode.

For every seed, partition scheme and mode, runs the in-process testbed (16 real nodes in one process,
real HTTP and mDNS on 127.0.0.1 only, as benchmarks/convergence.py does) with ``--compress MODE`` for a
fixed duration, and reads every node's ``/v1/status``: accuracy on the test split, its own steps, and its
exchange counters (``bytes_sent``; ``ok``: exchanges it started that committed; ``served``: exchanges it
answered and committed). The modes are paired: run r of every mode uses the same data split, the same
initial model (--init-seed I+r) and the same node seeds (1000r + i: minibatch order, peer choice); the
order of modes is rotated from one seed and scheme to the next, so that drift on a shared machine does
not fall on one mode.

Reported per mode: mean and min accuracy over the 16 nodes at the end, the mean accuracy over the last
10 s (less noisy: one test image is 0.28 points), MB sent per node, bytes sent per committed exchange and
side (sum over nodes of bytes_sent over the sum of ok + served: what one side sends in one exchange; the
few exchanges that abort or are declined also send bytes and count only in the numerator), and both
against ``none`` (paired by seed).

    .venv/bin/python benchmarks/compression.py [--modes none fp16 bf16 int8 topk:0.1 topk:0.01]
        [--schemes iid dirichlet:0.5] [--seeds 2] [--duration 50] [--reuse] [--raw DIR]

Writes benchmarks/results/compression.{json,md,png}; each run's testbed results.json goes under --raw
(a temporary folder by default, not committed); --reuse takes a run from there when its options match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from runstats import compact_curve, saved_runs  # noqa: E402
from runstats import mean_and_range as spread  # noqa: E402

from gossipfl.config import NodeConfig
from gossipfl.testbed import TestbedOptions, run_testbed

RESULTS = Path(__file__).parent / "results"
NODES = 16
INIT = 2026  # the nodes' default initial model (--data-seed); run r starts from INIT + r
SMOOTH_S = 10.0
MODES = ["none", "fp16", "bf16", "int8", "topk:0.1", "topk:0.01"]


def has_compress() -> bool:
    return any(f.name == "compress" for f in fields(NodeConfig))


def run_cell(scheme: str, mode: str, seed: int, args: argparse.Namespace) -> dict:
    """One testbed run; an earlier one with the same options when --reuse."""
    out = Path(args.raw) / f"{scheme.replace(':', '')}-{mode.replace(':', '')}-s{seed}"
    node_args = ["--partition-scheme", scheme, "--init-seed", str(INIT + seed)]
    if mode != "none" or has_compress():  # (before the option existed, "none" was the only behaviour)
        node_args += ["--compress", mode]
    node_args += args.node_args.split()
    opts = TestbedOptions(
        nodes=NODES, duration=args.duration, out=str(out), live=False, mode="inproc", seed=1000 * seed,
        extra_node_args=tuple(node_args),
    )  # fmt: skip
    found = out / "results.json"
    if args.reuse and found.exists():
        earlier = json.loads(found.read_text())
        mine = json.loads(json.dumps(asdict(opts)))
        if all(earlier["options"].get(k) == v for k, v in mine.items() if k not in ("out", "inproc_workers")):
            print(f"reusing {found}", flush=True)
            args.reused += 1
            return earlier
    print(f"run: {scheme} {mode} seed {seed}", flush=True)
    if asyncio.run(run_testbed(opts)) != 0:
        raise SystemExit(f"testbed failed: {scheme} {mode} seed {seed}")
    return json.loads(found.read_text())


def compact(res: dict, scheme: str, mode: str, seed: int) -> dict:
    """What the tables and the plot need from one run."""
    final = res["final"]
    accs = [f["accuracy"] or 0.0 for f in final.values()]
    ex = [f["exchanges"] or {} for f in final.values()]
    sent = [e.get("bytes_sent", 0) for e in ex]
    committed = sum(e.get("ok", 0) + e.get("served", 0) for e in ex)
    curve = compact_curve(res)
    t_end = curve[-1][0]
    tail = [row[1] for row in curve if row[0] >= t_end - SMOOTH_S]
    return {
        "scheme": scheme,
        "mode": mode,
        "seed": seed,
        "acc_mean": statistics.mean(accs),
        "acc_min": min(accs),
        "acc_tail": statistics.mean(tail),  # mean over the last SMOOTH_S seconds of the mean over nodes
        # how far apart the nodes' models are (RMS distance to their mean / the mean's norm), last SMOOTH_S s
        "consensus_rel": statistics.mean(
            c["consensus_distance"] / c["mean_norm"]
            for c in res["consensus"]
            if c["t"] >= t_end - SMOOTH_S and c["consensus_distance"] and c["mean_norm"]
        ),
        "mb_per_node": statistics.mean(sent) / 1e6,
        "bytes_per_exchange_side": sum(sent) / committed if committed else None,
        "committed_per_node": committed / len(ex),
        "not_committed": sum(e.get(k, 0) for e in ex for k in ("failed", "busy", "aborted", "declined", "rejected")),
        "rejected": sum(e.get("rejected", 0) for e in ex),
        "steps_mean": statistics.mean(f["steps"] or 0 for f in final.values()),
        "p50_exchange_s": statistics.median(e["p50_duration_s"] for e in ex if e.get("p50_duration_s") is not None),
        "final": {
            k: {"accuracy": f["accuracy"], "steps": f["steps"], "exchanges": f["exchanges"]} for k, f in final.items()
        },
        "curve": curve,
    }


def summarize(runs: list[dict], modes: list[str], schemes: list[str]) -> list[dict]:
    """Per scheme and mode: means over seeds, and the paired differences to none."""
    rows = []
    for scheme in schemes:
        base = {r["seed"]: r for r in runs if r["scheme"] == scheme and r["mode"] == "none"}
        for mode in modes:
            mine = [r for r in runs if r["scheme"] == scheme and r["mode"] == mode]
            if not mine:
                continue
            pairs = [(r, base[r["seed"]]) for r in mine if r["seed"] in base]

            def diff(key: str, pairs: list = pairs) -> list[float]:
                return [100 * (r[key] - b[key]) for r, b in pairs]

            rows.append(
                {
                    "scheme": scheme,
                    "mode": mode,
                    "seeds": len(mine),
                    "acc_mean": statistics.mean(r["acc_mean"] for r in mine),
                    "acc_min": statistics.mean(r["acc_min"] for r in mine),
                    "acc_tail": statistics.mean(r["acc_tail"] for r in mine),
                    "acc_tail_per_seed": [r["acc_tail"] for r in mine],
                    "mb_per_node": statistics.mean(r["mb_per_node"] for r in mine),
                    "bytes_per_exchange_side": statistics.mean(r["bytes_per_exchange_side"] for r in mine),
                    "committed_per_node": statistics.mean(r["committed_per_node"] for r in mine),
                    "steps_mean": statistics.mean(r["steps_mean"] for r in mine),
                    "consensus_rel": statistics.mean(r["consensus_rel"] for r in mine),
                    "rejected": sum(r["rejected"] for r in mine),
                    "p50_exchange_s": statistics.mean(r["p50_exchange_s"] for r in mine),
                    "d_acc_mean_pt": diff("acc_mean"),
                    "d_acc_tail_pt": diff("acc_tail"),
                    "bytes_ratio": [r["mb_per_node"] / b["mb_per_node"] for r, b in pairs],
                    "exchange_ratio": [r["bytes_per_exchange_side"] / b["bytes_per_exchange_side"] for r, b in pairs],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| partition | mode | seeds | accuracy mean (end) | min (end) | mean, last 10 s | vs none, last 10 s (pt) "
        "| vs none, end (pt) | MB sent per node | bytes vs none | bytes per exchange and side | per exchange vs none "
        "| exchanges per node | steps per node | p50 exchange ms | model spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['scheme']} | {r['mode']} | {r['seeds']} | {r['acc_mean']:.4f} | {r['acc_min']:.4f} "
            f"| {spread(r['acc_tail_per_seed'], '.4f')} | {spread(r['d_acc_tail_pt'], '+.2f')} "
            f"| {spread(r['d_acc_mean_pt'], '+.2f')} | {r['mb_per_node']:.2f} | {spread(r['bytes_ratio'], '.1%')} "
            f"| {r['bytes_per_exchange_side']:,.0f} | {spread(r['exchange_ratio'], '.1%')} "
            f"| {r['committed_per_node']:.0f} | {r['steps_mean']:.0f} | {1000 * r['p50_exchange_s']:.1f} "
            f"| {r['consensus_rel']:.2%} |"
        )
    return "\n".join(out)


def goals(rows: list[dict]) -> str:
    """The issue's goals, per partition scheme, judged on the mean over seeds of the last-10-s accuracy."""
    by = {(r["scheme"], r["mode"]): r for r in rows}
    lines = []
    for scheme in dict.fromkeys(r["scheme"] for r in rows):

        def get(mode: str, scheme: str = scheme) -> dict | None:
            return by.get((scheme, mode))

        for mode in ("fp16", "int8"):
            if (r := get(mode)) and r["d_acc_tail_pt"]:
                d = statistics.mean(r["d_acc_tail_pt"])
                lines.append(
                    f"- {scheme}, {mode} within 0.5 point of none: {d:+.2f} pt -> **{'pass' if d >= -0.5 else 'miss'}**"
                )
        if (r := get("topk:0.1")) and r["d_acc_tail_pt"]:
            d, b = statistics.mean(r["d_acc_tail_pt"]), statistics.mean(r["bytes_ratio"])
            ok = d >= -1.0 and b < 0.2
            lines.append(
                f"- {scheme}, topk:0.1 within 1 point at under 20% of the bytes: {d:+.2f} pt at {b:.1%} of the bytes "
                f"-> **{'pass' if ok else 'miss'}**"
            )
        if (r := get("int8")) and r["exchange_ratio"]:
            e = statistics.mean(r["exchange_ratio"])
            lines.append(
                f"- {scheme}, int8 bytes per exchange at most 30% of none: {e:.1%} "
                f"-> **{'pass' if e <= 0.3 else 'miss'}**"
            )
    return "\n".join(lines)


def plot(runs: list[dict], modes: list[str], schemes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(schemes), figsize=(6.5 * len(schemes), 4.6), squeeze=False, sharey=True)
    markers = "osD^vP*X"
    for ax, scheme in zip(axes[0], schemes, strict=True):
        for k, mode in enumerate(modes):
            mine = sorted((r for r in runs if r["scheme"] == scheme and r["mode"] == mode), key=lambda r: r["seed"])
            if not mine:
                continue
            pts = [(row[3], row[1]) for row in mine[0]["curve"] if row[3] > 0]  # the first seed's curve
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, alpha=0.8, label=mode)
            ax.scatter(  # every seed's end point (accuracy: last 10 s)
                [r["mb_per_node"] for r in mine], [r["acc_tail"] for r in mine],
                marker=markers[k % len(markers)], color=line.get_color(), s=36, zorder=3,
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set(title=f"{NODES} nodes, digits, {scheme}", xlabel="MB sent per node (log)", ylim=(0.8, 1.0))
        ax.set_ylabel("mean accuracy of the nodes")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--schemes", nargs="+", default=["iid", "dirichlet:0.5"])
    ap.add_argument("--seeds", type=int, default=2, help="paired runs of every mode (run r: init I+r, seeds 1000r..)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=50.0)
    ap.add_argument("--node-args", default="", help="more node options for every node")
    ap.add_argument("--raw", default=str(Path(tempfile.gettempdir()) / "gossipfl-compression"))
    ap.add_argument("--reuse", action="store_true", help="take a run's earlier results.json if its options match")
    ap.add_argument("--name", default="compression")
    ap.add_argument("--report-only", action="store_true", help="rewrite NAME.md and NAME.png from NAME.json")
    args = ap.parse_args()
    if "none" not in args.modes:
        args.modes = ["none", *args.modes]
    if args.report_only:
        print(write_report(*saved_runs(RESULTS / f"{args.name}.json"), args.name))
        return
    import gossipfl

    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.node()} ({platform.machine()}, 2 cores shared with other work, Python "
        f"{platform.python_version()})",
        "command": "python benchmarks/compression.py " + " ".join(sys.argv[1:]),
        "code": code_version(gossipfl.__file__),
        "args": vars(args),
    }
    args.reused = 0
    runs = []
    turn = 0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for scheme in args.schemes:
            order = args.modes[turn % len(args.modes) :] + args.modes[: turn % len(args.modes)]
            turn += 1
            for mode in order:
                runs.append(compact(run_cell(scheme, mode, seed, args), scheme, mode, seed))
                r = runs[-1]
                print(
                    f"{scheme} {mode} seed {seed}: accuracy {r['acc_mean']:.4f} (last 10 s {r['acc_tail']:.4f}), "
                    f"{r['mb_per_node']:.2f} MB/node, {r['bytes_per_exchange_side']:,.0f} B per exchange and side",
                    flush=True,
                )
    meta["reused"] = args.reused
    print(write_report(runs, meta, args.name))


def write_report(runs: list[dict], meta: dict, name: str) -> str:
    a = meta["args"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    schemes = list(dict.fromkeys(r["scheme"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    rows = summarize(runs, modes, schemes)
    n_reused = meta.get("reused", 0)
    reused = f" {n_reused} of the {len(runs)} runs were taken from earlier runs (--reuse)." if n_reused else ""
    report = f"""# Compression: accuracy against bytes sent, {NODES} nodes on `digits`

Run {meta["started"]} on {meta["host"]}, loopback only: `{meta["command"]}`. Node code: {meta["code"]}.

In-process testbed: {NODES} nodes in one process, each its own HTTP server on 127.0.0.1 and mDNS confined
to loopback, gossip every 0.25 s (the default), the node recipe of benchmarks/convergence.py
(20 steps/s per node), {a["duration"]:g} s from the moment all nodes know each other; `digits` (360
test images: one is 0.28 points). Every mode runs with the same {len(seeds)} seed(s): run r from initial
model {INIT}+r with node seeds 1000r+i (paired). Accuracy "end": the nodes' last evaluation; "last 10 s":
the mean over nodes averaged over the last 10 s of samples (the goals are judged on this, mean over seeds;
[min, max] over seeds in brackets). Bytes: `exchanges.bytes_sent` of each node's /v1/status (model
messages and decisions of exchanges); per exchange and side: the sum over nodes of bytes_sent over the
sum of committed exchanges counted on both sides (`ok` + `served`). Model spread: the RMS distance of
the nodes' models to their mean over the norm of the mean, averaged over the last 10 s (how far apart
gossip lets the models drift). Exchanges per node: committed, `ok` + `served`.{reused}

{table(rows)}

## Goals

{goals(rows)}

![accuracy against MB sent per node]({Path(name).name}.png)

Lines: the first seed's run (mean accuracy of the nodes against mean MB sent per node, sampled every
second); markers: each seed's end point (last-10-s accuracy).
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "rows": rows, "runs": runs}))
    (RESULTS / f"{name}.md").write_text(report)
    plot(runs, modes, schemes, RESULTS / f"{name}.png")
    return report


def code_version(module_file: str) -> str:
    import subprocess

    root = Path(module_file).resolve().parent.parent
    if (root / "COMMIT").exists():
        return (root / "COMMIT").read_text().strip() + f" (snapshot in {root})"
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "gossipfl"], capture_output=True, text=True
    )
    return head + (" with uncommitted changes in gossipfl/" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()

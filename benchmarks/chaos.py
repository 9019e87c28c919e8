"""Chaos benchmark: node processes on hosts that are Linux network namespaces on a bridge, real mDNS
multicast between them, faults injected from outside (``gossipfl.testbed.netns``). Three parts:

(a) Pure averaging (``--no-train``) while exchanges are lost. The knob (``--cut``) is a share q of the
    TCP segments on every host's link (each way) answered with a TCP reset instead of delivered. The reset
    reaches the socket on the host where the rule sits, not the far end: a cut segment leaving the
    initiator fails its exchange at once, but a cut reply leaves the initiator waiting for its 2 s timeout
    (about a quarter of the failures: 74 timeouts, 185 resets, 39 refused connections in the logs of one
    run at q = 0.016), holding one of its two outbound slots and backing off from that peer meanwhile.
    An exchange is about 16 segments, each crossing two links, so about 1 - (1 - q)^16 of them fail. Plain
    packet loss (``--drop``: tc netem, or nftables where the kernel has no netem) mostly turns into
    delay, TCP retransmitting: at 10% dropped on every link, exchanges take 0.15 s instead of 5 ms, two in
    five overlap another merge and abort, one in ten fails (a retransmission missed the nodes' 2 s
    timeouts); a different process from "an exchange fails with probability p", shown as an extra row.
    p is measured from the nodes' own counters (``/v1/status`` ``exchanges``): the share of the exchanges
    started that failed and were not committed late, (failed - late) / (ok + failed + busy + aborted).
    The models are read once per gossip interval; the variance across nodes V(t) (squared consensus
    distance) gives the per-interval reduction factor as in ``averaging.py``, next to the simulation of
    the protocol (``gossip_sim.simulate_pushpull``) at the measured p, with the measured exchange duration
    and pace; the simulation with every exchange that did not commit lost; and the large-N formula
    (1 + p) / 2 exp(-(1 - p) / 2). A cut commit leaves its exchange in doubt, and the initiator merges
    nothing else for up to FREEZE_S (see the report): the table shows what that costs.
(b) Re-convergence after a partition: pure averaging; after ``--before`` s the bridge is split into two
    halves for ``--partition`` s (each half converges to its own mean, which it conserves), then healed.
    Re-converged: the variance across all nodes is 1% of what it was at the heal. Also: when each node
    first committed an exchange it started with a node of the other half (``last_ok_s_ago`` of its peers).
(c) Training ``digits`` while a quarter of the nodes are SIGKILLed and restarted from their checkpoints
    (``--state-dir``), against the same run without faults: final accuracy of survivors and restarted
    nodes, and how long the restarted ones take to come back within 1 point of the others.

Needs root, ``ip`` and ``tc`` (and ``nft`` for loss on kernels without netem).

    .venv/bin/pip install -e '.[bench]'
    sudo .venv/bin/python benchmarks/chaos.py --parts a,b
    sudo .venv/bin/python benchmarks/chaos.py --parts c
    # defaults: --nodes 16 --runs 3 --cut 0 0.0075 0.016 --drop 0.1 --gossip-interval 0.5 --partition 30

(a) and (b) at 16 nodes took 9 and 3 minutes on 2 cores. Writes benchmarks/results/NAME.md, NAME.json
and NAME.png (NAME: ``--name``, default chaos); a run of some parts keeps the other parts' results from
NAME.json; ``--replot`` redraws them from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gossip_sim import reduction_factor, simulate_pushpull, theory_with_loss  # noqa: E402

from gossipfl.protocol.consensus import consensus_distance, network_mean  # noqa: E402
from gossipfl.protocol.consensus import flatten as flat  # noqa: E402
from gossipfl.testbed.netns import Network, missing_requirements  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FLOOR = 1e-10  # as averaging.py: stop the fit while the spread is well above float32 rounding
KEYS = ("ok", "failed", "busy", "aborted", "late", "in_doubt", "served")


def params_of(payload: bytes) -> np.ndarray:
    obj = msgpack.unpackb(payload, raw=False)
    return flat({k: np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for k, t in obj["params"].items()})


def vectors(net: Network) -> dict[int, np.ndarray]:
    return {i: params_of(b) for i, b in enumerate(net.models()) if b is not None}


def variance(vs: list[np.ndarray]) -> float:
    return consensus_distance(vs) ** 2 if len(vs) > 1 else float("nan")


def start_all(net: Network, args: list[str], gi: float, seed: int = 0) -> None:
    n = len(net.hosts)
    for i in range(n):
        net.start(
            i,
            [
                "--cluster",
                f"chaos-{net.prefix.strip('-')}",
                "--seed",
                str(seed + i),
                "--partition",
                f"{i}/{n}",
                "--gossip-interval",
                f"{gi:g}",
                *args,
            ],
        )
    net.wait_ready(timeout=180)


def all_statuses(net: Network, timeout: float = 20.0) -> list[dict]:
    """Every node's status, asking again while one does not answer (a loaded machine)."""
    deadline = time.monotonic() + timeout
    while None in (sts := net.statuses(timeout=5.0)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no status from hosts {[i for i, st in enumerate(sts) if st is None]}")
    return sts  # type: ignore[return-value]


def shares(before: list, after: list, gi: float) -> dict:
    """Exchange counts over the window, summed over nodes; p, the measured exchange duration and pace."""
    d = {
        k: sum(b["exchanges"].get(k, 0) - a["exchanges"].get(k, 0) for a, b in zip(before, after, strict=True))
        for k in KEYS
    }
    started = max(1, d["ok"] + d["failed"] + d["busy"] + d["aborted"])
    durations = [s["exchanges"]["mean_duration_s"] for s in after if s["exchanges"]["mean_duration_s"]] or [0.0]
    return {
        **d,
        "started": started,
        "p": (d["failed"] - d["late"]) / started,
        "not_committed": 1 - (d["ok"] + d["late"]) / started,
        "d": statistics.mean(durations) / gi,
        "pace": max(1.0, statistics.median(s["exchanges"]["pace_s"] for s in after) / gi),
    }


def every(gi: float, t0: float, k: int) -> None:
    time.sleep(max(0.0, t0 + k * gi - time.monotonic()))


# -- (a) -------------------------------------------------------------------------------------------
def averaging_run(args: argparse.Namespace, loss: float, reset: bool, run: int, logs: Path) -> dict:
    with Network(args.nodes, logs / f"a-{'cut' if reset else 'drop'}{loss:g}-run{run}") as net:
        start_all(net, ["--no-train"], args.gossip_interval, seed=1000 * run)
        for i in range(args.nodes):
            net.impair(i, loss=loss, reset=reset)
        before, t0, v = all_statuses(net), time.monotonic(), []
        for k in range(args.intervals + 1):
            every(args.gossip_interval, t0, k)
            v.append(variance(list(vectors(net).values())))
        after = all_statuses(net)
        window = time.monotonic() - t0
    return {"v": v, "window_s": window, **shares(before, after, args.gossip_interval)}


def part_a(args: argparse.Namespace, logs: Path) -> list[dict]:
    rows = []
    for reset, levels in ((True, args.cut), (False, args.drop)):
        for loss in levels:
            runs = [averaging_run(args, loss, reset, r, logs) for r in range(args.runs)]
            measured = [reduction_factor(np.array(r["v"]), burn_in=1, floor=FLOOR) for r in runs]
            p = statistics.mean(r["p"] for r in runs)
            d = statistics.mean(r["d"] for r in runs)
            pace = statistics.mean(r["pace"] for r in runs)
            counts: dict[str, int] = {}
            sims = [
                reduction_factor(
                    simulate_pushpull(args.nodes, 60, s, duration=d, overlap="abort", counts=counts, pace=pace, loss=p),
                    floor=FLOOR,
                )
                for s in range(args.sim_runs)
            ]
            sim_nc = 1 - counts["committed"] / max(1, counts["committed"] + counts["aborted"] + counts["failed"])
            sim_rate = counts["committed"] / (args.sim_runs * 60 * args.nodes)  # per node per interval
            # every exchange that did not commit changes neither node, failed or aborted: the simulation with
            # all of them lost (instantaneous exchanges, so that none is counted twice)
            nc = statistics.mean(r["not_committed"] for r in runs)
            sims_nc = [
                reduction_factor(simulate_pushpull(args.nodes, 60, s, loss=nc), floor=FLOOR)
                for s in range(args.sim_runs)
            ]
            row = {
                "kind": "cut" if reset else "drop",
                "q": loss,
                "p": p,
                "factor": measured,
                "not_committed": nc,
                "sim_at_not_committed": statistics.mean(sims_nc),
                "sim_not_committed": sim_nc,
                "sim_committed_rate": sim_rate,
                "sim": statistics.mean(sims),
                "sim_std": statistics.stdev(sims),
                "theory": theory_with_loss(p),
                "d": d,
                "pace": pace,
                "runs": runs,
                "sim_curve": simulate_pushpull(
                    args.nodes, args.intervals, 0, duration=d, overlap="abort", pace=pace, loss=p
                ).tolist(),
            }
            rows.append(row)
            print(
                f"(a) {row['kind']} {loss:g}: p={p:.3f}, measured {statistics.mean(measured):.3f} "
                f"({', '.join(f'{m:.3f}' for m in measured)}), simulated {row['sim']:.3f}",
                flush=True,
            )
    return rows


# -- (b) -------------------------------------------------------------------------------------------
def crossed_at(status: dict, other: set[str], now: float) -> float | None:
    """When ``status``'s node last committed an exchange it started with a node of ``other`` (our clock)."""
    times = [now - p["last_ok_s_ago"] for p in status["peers"] if p["id"] in other and p["last_ok_s_ago"] is not None]
    return max(times, default=None)


def partition_run(args: argparse.Namespace, run: int, logs: Path) -> dict:
    n, gi = args.nodes, args.gossip_interval
    halves = [list(range(n // 2)), list(range(n // 2, n))]
    with Network(n, logs / f"b-run{run}") as net:
        ids = [h.node_id for h in net.hosts]
        side = {ids[i]: k for k, half in enumerate(halves) for i in half}
        start_all(net, ["--no-train"], gi, seed=1000 * run)
        t0 = time.monotonic()
        t_part, t_heal = t0 + args.before, t0 + args.before + args.partition
        rows, heal_backoff, k, phase = [], [], 0, "before"
        while (now := time.monotonic()) < t_heal + args.after:
            if phase == "before" and now >= t_part:
                net.partition(halves)
                t_part, phase = time.monotonic(), "partitioned"
            if phase == "partitioned" and now >= t_heal:
                heal_backoff = [p["retry_in_s"] for i, st in enumerate(net.statuses()) if st
                                for p in st["peers"] if side.get(p["id"]) != side[ids[i]]]  # fmt: skip
                net.heal()
                t_heal, phase = time.monotonic(), "healed"
            vs, sts, t = vectors(net), net.statuses(), time.monotonic()
            row = {
                "t": t - t0,
                "v": variance(list(vs.values())),
                "gap": float(
                    np.linalg.norm(
                        network_mean([vs[i] for i in halves[0] if i in vs])
                        - network_mean([vs[i] for i in halves[1] if i in vs])
                    )
                ),
                "crossed": [
                    None if st is None else crossed_at(st, {x for x in ids if side[x] != side[ids[i]]}, t)
                    for i, st in enumerate(sts)
                ],
            }
            row["crossed"] = [None if c is None else c - t0 for c in row["crossed"]]
            rows.append(row)
            k += 1
            every(gi, t0, k)
    th, tp = t_heal - t0, t_part - t0
    v_heal = [r["v"] for r in rows if r["t"] <= th][-1]
    after = [r for r in rows if r["t"] > th]
    back = next((r["t"] - th for r in after if r["v"] <= 0.01 * v_heal), None)
    # per node, the earliest crossing seen after the heal (sampled every interval: its last one by then)
    first_cross = [
        min((r["crossed"][i] - th for r in after if (r["crossed"][i] or 0) > th), default=None) for i in range(n)
    ]
    during = {c for r in rows for c in r["crossed"] if c is not None and tp + 0.5 < c <= th}
    return {
        "rows": rows,
        "t_partition": tp,
        "t_heal": th,
        "v_heal": v_heal,
        "reconverged_s": back,
        "first_cross_s": first_cross,
        "crossings_during_partition": len(during),
        "backoff_at_heal_s": heal_backoff,
    }


def part_b(args: argparse.Namespace, logs: Path) -> list[dict]:
    out = []
    for r in range(args.b_runs):
        res = partition_run(args, r, logs)
        gi = args.gossip_interval
        back = res["reconverged_s"]
        print(
            f"(b) run {r}: re-converged {'never' if back is None else f'{back / gi:.1f} intervals'} after the heal; "
            f"crossings during the partition: {res['crossings_during_partition']}",
            flush=True,
        )
        out.append(res)
    return out


# -- (c) -------------------------------------------------------------------------------------------
def training_run(args: argparse.Namespace, faults: bool, logs: Path, state: Path | None) -> dict:
    n, gi = args.nodes, args.c_gossip_interval
    victims = [i for i in range(n) if i % 4 == 3]  # a quarter of the nodes, spread over the shards
    extra = (
        [] if state is None else ["--state-dir", str(state), "--checkpoint-interval", f"{args.checkpoint_interval:g}"]
    )
    rows, events = [], {}
    with Network(n, logs / f"c-{'faults' if faults else 'baseline'}") as net:
        start_all(net, extra, gi)
        t0, k = time.monotonic(), 0
        while (now := time.monotonic() - t0) < args.c_duration:
            if faults and "kill" not in events and now >= args.kill_at:
                for i in victims:
                    net.kill(i)
                events["kill"] = time.monotonic() - t0
            if faults and "restart" not in events and now >= args.restart_at:
                for i in victims:
                    net.restart(i)
                events["restart"] = time.monotonic() - t0
            sts = net.statuses()
            rows.append(
                {
                    "t": time.monotonic() - t0,
                    "acc": [None if s is None else s["metrics"]["accuracy"] for s in sts],
                    "resumed": [None if s is None else (s.get("checkpoint") or {}).get("resumed") for s in sts],
                }
            )
            k += 1
            every(args.sample, t0, k)
    return {"rows": rows, "events": events, "victims": victims}


def group_mean(row: dict, members: list[int]) -> float | None:
    accs = [row["acc"][i] for i in members if row["acc"][i] is not None]
    return statistics.mean(accs) if len(accs) == len(members) else None


def part_c(args: argparse.Namespace, logs: Path) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, faults in (("baseline", False), ("faults", True)):
            state = Path(tmp) / name if args.checkpoints else None
            out[name] = training_run(args, faults, logs, state)
    res = {"runs": out, "checkpoints": args.checkpoints}
    res["summary"] = summarize_c(res, args.nodes, args.c_gossip_interval, args.c_duration, args.final_window)
    print(f"(c) {json.dumps(res['summary'])}", flush=True)
    return res


BACK_SAMPLES = 2  # a restarted node is back once within 1 point of the survivors in this many reads in a row


def summarize_c(res: dict, n: int, gi: float, duration: float, window: float) -> dict:
    """Final accuracies (mean over the last ``window`` s) of survivors and restarted nodes in both runs, and
    when the restarted nodes were back: each within 1 point of the survivors' mean for BACK_SAMPLES reads
    in a row (the last of them to get there counts)."""
    out = res["runs"]
    victims = out["faults"]["victims"]
    survivors = [i for i in range(n) if i not in victims]
    summary: dict = {}
    for name, run in out.items():
        tail = [r for r in run["rows"] if r["t"] >= duration - window]
        summary[name] = {}
        for g, members in (("survivors", survivors), ("restarted", victims)):
            means = [m for r in tail if (m := group_mean(r, members)) is not None]
            summary[name][g] = statistics.mean(means) if means else None
    run = out["faults"]
    t_restart = run["events"].get("restart", float("inf"))
    after = [r for r in run["rows"] if r["t"] > t_restart]
    up = next((r["t"] for r in after if all(r["acc"][i] is not None for i in victims)), None)
    per_node = {}
    for i in victims:
        ok = [
            (s := group_mean(r, survivors)) is not None and r["acc"][i] is not None and r["acc"][i] >= s - 0.01
            for r in after
        ]
        per_node[i] = next(
            (after[k]["t"] for k in range(len(ok) - BACK_SAMPLES + 1) if all(ok[k : k + BACK_SAMPLES])), None
        )
    back = None if not per_node or None in per_node.values() else max(per_node.values())
    summary["recovery"] = {
        "up_s": None if up is None else up - t_restart,
        "back_s": None if back is None else back - t_restart,
        "back_intervals": None if back is None else (back - t_restart) / gi,
        # from when the restarted nodes answered again (a process start, torch imported, data loaded)
        "back_after_up_intervals": None if back is None or up is None else (back - up) / gi,
        "back_per_node_s": {str(i): None if t is None else round(t - t_restart, 2) for i, t in per_node.items()},
        "sample_s": round(statistics.median(b["t"] - a["t"] for a, b in zip(after, after[1:], strict=False)), 2)
        if len(after) > 1
        else None,
        "resumed": [after[-1]["resumed"][i] for i in victims] if after else [],
    }
    return summary


# -- report --------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict) -> str:
    lines = ["# Chaos testbed: lost exchanges, a partition, killed and restarted nodes", ""]
    if "a" in res:
        a, cfg = res["a"], res["a_config"]
        lines += [
            f"## (a) Pure averaging while exchanges are lost ({cfg['when']})",
            "",
            f"`{cfg['command']}`",
            "",
            f"{cfg['nodes']} node processes, one per network namespace, on one bridge; mDNS discovery; "
            f"`--no-train`, gossip interval {cfg['gossip_interval']:g} s, models read once per interval for "
            f"{cfg['intervals']} intervals, {cfg['runs']} runs per row. q: share of TCP segments on every link "
            "answered with a reset (cut) or dropped (drop). p: measured share of started exchanges that "
            "failed (not committed late). Simulated: the protocol at the measured p, exchange duration and pace "
            f"({cfg['sim_runs']} runs).",
            "",
            "| knob | q | p: failed (measured) | not committed: measured / simulated at p "
            "| committed per node and interval: measured / simulated at p "
            "| factor per interval, measured | simulated at p | measured / simulated "
            "| simulated, every exchange not committed lost | measured / that | (1+p)/2·exp(−(1−p)/2), large N |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a:
            m = statistics.mean(r["factor"])
            sd = statistics.stdev(r["factor"]) if len(r["factor"]) > 1 else 0.0
            windows = [run.get("window_s", cfg["intervals"] * cfg["gossip_interval"]) for run in r["runs"]]
            rate = statistics.mean(
                (run["ok"] + run["late"]) / cfg["nodes"] / (w / cfg["gossip_interval"])
                for run, w in zip(r["runs"], windows, strict=True)
            )
            lines.append(
                f"| {r['kind']} | {r['q']:g} | {r['p']:.3f} | {r['not_committed']:.3f} / "
                f"{r['sim_not_committed']:.3f} | {rate:.2f} / {r['sim_committed_rate']:.2f} "
                f"| {m:.3f} ± {sd:.3f} | {r['sim']:.3f} ± {r['sim_std']:.3f} "
                f"| {m / r['sim']:.2f} | {r['sim_at_not_committed']:.3f} | {m / r['sim_at_not_committed']:.2f} "
                f"| {r['theory']:.3f} |"
            )
        lines += [
            "",
            "Every exchange that does not commit changes neither node, failed or not. The simulation fails an "
            "exchange at once and independently of the others; on the nodes, a commit that goes unanswered leaves "
            "its exchange in doubt, and the initiator merges nothing until it learns the outcome (asked again "
            "after 0.1 s, then backing off; at most `FREEZE_S` = 3 s), and a cut reply fails only at the "
            "initiator's 2 s timeout, holding one of its two outbound slots and backing it off from that peer. "
            "In the node logs of these runs the timeouts were 12% of the failures at q = 0.0075 and 19-30% at "
            "q = 0.016, and every doubt was settled (16-19 per run at q = 0.016): the slow failures are the "
            "likely reason for the larger gap at the higher loss (not isolated by an experiment). With plain "
            "packet loss (drop) TCP retransmits: exchanges take about 0.15 s instead of 5 ms, two in five overlap "
            "another merge and abort, one in ten fails. (The drop row was measured with the rule in the hosts' "
            "output and input; the testbed now drops on the bridge, silently, as a wire would.)",
        ]
        lines.append("")
    if "b" in res:
        cfg = res["b_config"]
        gi = cfg["gossip_interval"]
        lines += [
            f"## (b) Re-convergence after a partition heals ({cfg['when']})",
            "",
            f"`{cfg['command']}`",
            "",
            f"{cfg['nodes']} nodes, `--no-train`, gossip interval {gi:g} s; split into two halves "
            f"(bridge ends moved to a second bridge) {cfg['before']:g} s after all found each other, healed "
            f"{cfg['partition']:g} s later. Re-converged: variance across all nodes at 1% of its value at the "
            "heal (an unpartitioned network takes "
            f"{cfg['unpartitioned_intervals']:.1f} intervals for that, simulated). First crossing: when a node "
            "first committed an exchange it started with the other half. Backoff: the seconds each node "
            "still waited before trying each peer of the other half when the partition healed.",
            "",
            "| run | exchanges across during the partition | re-converged after (intervals) "
            "| first crossing, median / last node (intervals) | nodes crossed "
            "| backoff at the heal, median / max (s) |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(res["b"]):
            fc = [x for x in r["first_cross_s"] if x is not None]
            bo = r["backoff_at_heal_s"] or [0.0]
            back = r["reconverged_s"]
            lines.append(
                f"| {i} | {r['crossings_during_partition']} | {fmt(None if back is None else back / gi)} | "
                f"{fmt(statistics.median(fc) / gi if fc else None)} / {fmt(max(fc) / gi if fc else None)} "
                f"| {len(fc)} of {len(r['first_cross_s'])} | {statistics.median(bo):.1f} / {max(bo):.1f} |"
            )
        lines.append("")
    if "c" in res:
        c, cfg = res["c"], res["c_config"]
        s = c["summary"]
        rec = s["recovery"]
        lines += [
            f"## (c) Training while a quarter of the nodes are killed and restarted ({cfg['when']})",
            "",
            f"`{cfg['command']}`",
            "",
            f"{cfg['nodes']} nodes training `digits` (shard i of N each), gossip interval "
            f"{cfg['gossip_interval']:g} s; SIGKILL of nodes {c['runs']['faults']['victims']} at "
            f"{cfg['kill_at']:g} s, restarted at {cfg['restart_at']:g} s "
            f"({'from their checkpoints, --state-dir' if c['checkpoints'] else 'WITHOUT checkpoints: fresh start'}); "
            f"accuracy: mean over the last {cfg['final_window']:g} s of a {cfg['duration']:g} s run.",
            "",
            "| run | survivors | restarted nodes (the same nodes in the baseline) |",
            "|---|---|---|",
            f"| without faults | {s['baseline']['survivors']:.4f} | {s['baseline']['restarted']:.4f} |",
            f"| with faults | {s['faults']['survivors']:.4f} | {s['faults']['restarted']:.4f} |",
            "",
            f"Restarted nodes answering again {fmt(rec['up_s'])} s after the restart; each within 1 point of the "
            f"survivors' mean in {BACK_SAMPLES} reads in a row (reads every {fmt(rec.get('sample_s'))} s) "
            f"{fmt(rec['back_s'])} s after it, the last of them ({fmt(rec['back_intervals'])} gossip intervals; "
            f"{fmt(rec.get('back_after_up_intervals'))} from when they answered; per node, s after the restart: "
            f"{rec.get('back_per_node_s')}); resumed from a checkpoint: {rec['resumed']}.",
            "",
        ]
    if "c" not in res:
        lines += ["## (c) Training while a quarter of the nodes are killed and restarted", "",
                  "Not run yet: `python benchmarks/chaos.py --parts c`.", ""]  # fmt: skip
    lines += [
        f"Machine: {platform.node()}, {platform.machine()}, Python {platform.python_version()}.",
        "",
        "![chaos](chaos.png)",
        "",
    ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in "abc" if p in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        if part == "a":
            for k, r in enumerate(res["a"]):
                for j, run in enumerate(r["runs"]):
                    v = np.array(run["v"])
                    label = f"{r['kind']} q={r['q']:g}, p={r['p']:.2f}" if j == 0 else None
                    ax.semilogy(v / v[0], color=f"C{k}", alpha=0.6, label=label)
                sim = np.array(r["sim_curve"])
                ax.semilogy(sim / sim[0], color=f"C{k}", ls="--")
            ax.set(
                title="(a) averaging, exchanges lost (dashed: simulated)",
                xlabel="gossip intervals",
                ylabel="V(t) / V(0)",
                ylim=(1e-12, 2),
            )
        elif part == "b":
            for k, r in enumerate(res["b"]):
                t = [row["t"] for row in r["rows"]]
                ax.semilogy(t, [row["v"] for row in r["rows"]], color=f"C{k}", label=f"run {k}")
                ax.axvspan(r["t_partition"], r["t_heal"], color="0.9")
            ax.set(title="(b) partition (grey) and heal", xlabel="seconds", ylabel="variance across nodes",
                   ylim=(1e-14, None))  # fmt: skip
        else:
            runs, victims = res["c"]["runs"], res["c"]["runs"]["faults"]["victims"]
            n = len(runs["faults"]["rows"][0]["acc"])
            survivors = [i for i in range(n) if i not in victims]
            for name, members, base in (("survivors", survivors, "0.45"), ("restarted", victims, "0.75")):
                for run, color in (("baseline", base), ("faults", "C0" if name == "survivors" else "C3")):
                    rows = runs[run]["rows"]
                    m = [group_mean(r, members) for r in rows]  # None (a gap in the line) while a node is down
                    ax.plot([r["t"] for r in rows], [np.nan if x is None else x for x in m], color=color,
                            ls="-" if run == "faults" else ":",
                            label=f"{name} ({'with faults' if run == 'faults' else 'no faults'})")  # fmt: skip
            ax.set_ylim(0.9, 1.0)
            for name, t in runs["faults"]["events"].items():
                ax.axvline(t, color="k", lw=0.8, ls="--")
                ax.text(t, ax.get_ylim()[0], f" {name}", rotation=90, va="bottom", fontsize=8)
            ax.set(title="(c) training, a quarter killed and restarted", xlabel="seconds", ylabel="accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="a,b", help="comma-separated: a, b, c")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--gossip-interval", type=float, default=0.5, help="(a) and (b)")
    # (a)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sim-runs", type=int, default=40)
    ap.add_argument("--intervals", type=int, default=30)
    ap.add_argument("--cut", type=float, nargs="*", default=[0, 0.0075, 0.016], help="shares of segments reset")
    ap.add_argument("--drop", type=float, nargs="*", default=[0.1], help="shares of packets dropped (extra rows)")
    # (b)
    ap.add_argument("--b-runs", type=int, default=2)
    ap.add_argument("--before", type=float, default=3.0, help="seconds before the partition")
    ap.add_argument("--partition", type=float, default=30.0, help="seconds of partition")
    ap.add_argument("--after", type=float, default=15.0, help="seconds after the heal")
    # (c)
    ap.add_argument("--c-gossip-interval", type=float, default=0.25)
    ap.add_argument("--c-duration", type=float, default=150.0)
    ap.add_argument("--kill-at", type=float, default=50.0)
    ap.add_argument("--restart-at", type=float, default=70.0)
    ap.add_argument("--checkpoint-interval", type=float, default=5.0)
    ap.add_argument(
        "--no-checkpoints",
        dest="checkpoints",
        action="store_false",
        help="(c) without --state-dir: restarted nodes start afresh (for trying the code path)",
    )
    ap.add_argument("--sample", type=float, default=1.0, help="(c) seconds between reads")
    ap.add_argument("--final-window", type=float, default=15.0)
    ap.add_argument("--name", default="chaos")
    ap.add_argument("--logs", type=Path, help="node logs here (default: a temporary folder)")
    ap.add_argument("--replot", action="store_true", help="redraw NAME.png and NAME.md from NAME.json")
    args = ap.parse_args()
    js = RESULTS / f"{args.name}.json"
    res = json.loads(js.read_text()) if js.exists() else {}
    if not args.replot:
        if why := missing_requirements():
            raise SystemExit(f"chaos: {why}")
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        command = "python benchmarks/chaos.py " + " ".join(sys.argv[1:])
        with tempfile.TemporaryDirectory() as tmp:
            logs = args.logs or Path(tmp)
            for part in args.parts.split(","):
                started = time.monotonic()
                if part == "a":
                    res["a"] = part_a(args, logs)
                    cfg = {
                        "nodes": args.nodes,
                        "gossip_interval": args.gossip_interval,
                        "intervals": args.intervals,
                        "runs": args.runs,
                        "sim_runs": args.sim_runs,
                    }
                elif part == "b":
                    res["b"] = part_b(args, logs)
                    sims = [reduction_factor(simulate_pushpull(args.nodes, 60, s), floor=FLOOR) for s in range(40)]
                    cfg = {
                        "nodes": args.nodes,
                        "gossip_interval": args.gossip_interval,
                        "before": args.before,
                        "partition": args.partition,
                        "after": args.after,
                        "unpartitioned_intervals": float(np.log(0.01) / np.log(statistics.mean(sims))),
                    }
                elif part == "c":
                    res["c"] = part_c(args, logs)
                    cfg = {
                        "nodes": args.nodes,
                        "gossip_interval": args.c_gossip_interval,
                        "kill_at": args.kill_at,
                        "restart_at": args.restart_at,
                        "duration": args.c_duration,
                        "final_window": args.final_window,
                    }
                else:
                    raise SystemExit(f"chaos: unknown part {part!r} (a, b or c)")
                res[f"{part}_config"] = {
                    **cfg,
                    "when": when,
                    "command": command,
                    "wall_s": round(time.monotonic() - started, 1),
                }
                print(f"({part}) took {time.monotonic() - started:.0f} s", flush=True)
                RESULTS.mkdir(exist_ok=True)
                js.write_text(json.dumps(res, indent=1))  # after each part: a later failure loses none of it
    elif "c" in res:  # the recovery criterion may have changed since the run: recompute it from the reads
        c = res["c_config"]
        res["c"]["summary"] = summarize_c(res["c"], c["nodes"], c["gossip_interval"], c["duration"], c["final_window"])
    text = report(res).replace("(chaos.png)", f"({args.name}.png)")
    (RESULTS / f"{args.name}.md").write_text(text)
    plot(res, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()

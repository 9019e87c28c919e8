"""Training overhead of gossip: local steps per second of a training node with gossip on against gossip off.

Real node processes (``python -m gossipfl node``) on 127.0.0.1, static discovery, real HTTP exchanges.
The measured node A trains; its throughput is the growth of ``steps`` in its ``/v1/status`` (its own
minibatch steps) over a fixed window after a warm-up, timed by the node's own ``uptime_s``. Every node
runs with ``--torch-threads 1`` (so two nodes fit on the two cores of the test machine), ``--join-wait 0``
(no wait for a trained peer) and ``--eval-interval 3600`` (one evaluation at start, none in the window: it
costs the same with gossip on and off, and only adds noise). Conditions, all with the same node A:

- ``off``: A alone, no peers;
- ``off+idle``: A alone, plus an idle process B running the same model (``--no-train``, no peers, so no
  exchanges): what a second process costs by its mere presence;
- ``on+idle``: A and B (``--no-train``) know each other and exchange at the default ``--gossip-interval``
  (both start exchanges; B only averages): against ``off+idle``, the cost of the exchanges themselves
  (encoding, HTTP on loopback, decoding and merging, on both sides, on the same two cores);
- ``off+busy``: A plus a training B that does not know A: what sharing the two cores with a second
  trainer costs;
- ``on+busy``: A and a training B exchanging: two real gossip learners. Against ``off``, the number the
  issue's goal asks for (on at least 90% of off); against ``off+busy``, the exchange cost alone with both
  cores busy training.

On this 2-core machine the peer process competes with A for CPU (and the machine is shared with other
work), so ``on+busy`` against ``off`` mixes two costs: that of the exchange and that of sharing the CPU
with a second trainer; the two ``off+`` conditions separate them. Conditions are run in cycles,
alternating order (forward, then backward) to cancel drift, and each ratio is taken within a cycle.

Two training regimes: ``flat-out`` (``--train-interval 0.001 --steps-per-round 20``: a node trains about
as fast as it can, so CPU taken by gossip shows up as fewer steps) and ``default`` (the node's own pacing:
``--train-interval 0.1``, 2 steps a round, at most 20 steps/s; gossip costs steps only if it delays a round).

    .venv/bin/python benchmarks/overhead.py [--tasks digits synthetic:mb=10 synthetic:mb=100]
        [--regimes flat-out default] [--cycles 2] [--window 8] [--warmup 4] [--port 19100]

Writes benchmarks/results/overhead.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from runstats import mean_and_range, saved_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONDITIONS = ("off", "off+idle", "on+idle", "off+busy", "on+busy")
REGIMES = {"flat-out": ("--train-interval", "0.001", "--steps-per-round", "20"), "default": ()}
DEFAULT_CONDITIONS = {"flat-out": CONDITIONS, "default": ("off", "off+busy", "on+busy")}
TICK = os.sysconf("SC_CLK_TCK")


def status(port: int, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=timeout) as r:
        return json.loads(r.read())


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Node:
    """One ``gossipfl node`` process on 127.0.0.1, static discovery only."""

    def __init__(self, port: int, task: str, logdir: Path, *, seeds: int | None, train: bool, regime: str) -> None:
        self.port = port
        args = [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--id", f"ovh-{port}", "--cluster", f"ovh-{os.getpid()}", "--task", task, "--discovery", "static"]
        args += ["--torch-threads", "1", "--join-wait", "0", "--eval-interval", "3600", *REGIMES[regime]]
        if seeds is not None:
            args += ["--seeds", f"127.0.0.1:{seeds}"]
        if not train:
            args.append("--no-train")
        self.log = open(logdir / f"node-{port}-{time.time_ns()}.log", "w")  # noqa: SIM115 - closed in stop()
        # not in the checkout: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=logdir)

    def wait_up(self, timeout: float = 90.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node on port {self.port} exited with {self.proc.returncode} ({self.log.name})")
            try:
                return status(self.port, 2.0)
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"node on port {self.port} not up after {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def exchanged(st: dict) -> int:
    ex = st["exchanges"]
    return ex["ok"] + ex["served"]


def measure(task: str, regime: str, cond: str, args: argparse.Namespace, logdir: Path) -> dict:
    """One measurement of condition ``cond``: start the processes, warm up, count A's steps over the window."""
    pa, pb = args.port, args.port + 1
    on = cond.startswith("on")
    nodes = [Node(pa, task, logdir, seeds=pb if on else None, train=True, regime=regime)]
    try:
        if cond != "off":
            nodes.append(Node(pb, task, logdir, seeds=pa if on else None, train=cond.endswith("busy"), regime=regime))
        for n in nodes:
            n.wait_up()
        end = time.monotonic() + 60.0
        while on and exchanged(status(pa)) < 1:  # the first exchange done (a big model's first takes a while)
            if time.monotonic() > end:
                raise RuntimeError(f"{task} {cond}: no exchange in 60 s")
            time.sleep(0.2)
        time.sleep(args.warmup)
        load = float(Path("/proc/loadavg").read_text().split()[0])
        cpu0 = [cpu_s(n.proc.pid) for n in nodes]
        s0 = status(pa)
        time.sleep(args.window)
        s1 = status(pa)
        cpu1 = [cpu_s(n.proc.pid) for n in nodes]
    finally:
        for n in nodes:
            n.stop()
    dt = s1["uptime_s"] - s0["uptime_s"]
    e0, e1 = s0["exchanges"], s1["exchanges"]
    return {
        "task": task,
        "regime": regime,
        "condition": cond,
        "window_s": round(dt, 3),
        "steps": s1["steps"] - s0["steps"],
        "steps_per_s": (s1["steps"] - s0["steps"]) / dt,
        "exchanges": exchanged(s1) - exchanged(s0),  # A's committed exchanges, either side, in the window
        "failed_busy_aborted": sum(e1[k] - e0[k] for k in ("failed", "busy", "aborted", "declined")),
        "bytes_sent_per_s": (e1["bytes_sent"] - e0["bytes_sent"]) / dt,
        "p50_exchange_s": e1.get("p50_duration_s"),
        "pace_s": e1.get("pace_s"),
        "cpu_a": round((cpu1[0] - cpu0[0]) / dt, 3),  # cores used by A during the window
        "cpu_b": round((cpu1[1] - cpu0[1]) / dt, 3) if len(nodes) > 1 else None,
        "loadavg_1m": load,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per task, regime and condition: steps/s over cycles, and the ratios to the baselines, taken within
    each cycle (paired) and then averaged."""
    rows = []
    keys = sorted({(r["task"], r["regime"]) for r in runs}, key=lambda k: (k[1], k[0]))
    for task, regime in keys:
        mine = [r for r in runs if r["task"] == task and r["regime"] == regime]
        by = {c: [r for r in mine if r["condition"] == c] for c in CONDITIONS}

        def ratio(cond: str, base: str, key: str = "steps_per_s", by: dict = by) -> list[float]:
            return [a[key] / b[key] for a, b in zip(by[cond], by[base], strict=False)]

        for r in mine:  # A's steps per CPU second of A: what A's own exchange work costs it, whatever the load
            r["steps_per_cpu_s"] = r["steps_per_s"] / r["cpu_a"] if r["cpu_a"] else None

        for cond in CONDITIONS:
            if not by[cond]:
                continue
            sps = [r["steps_per_s"] for r in by[cond]]
            base = {"on+idle": "off+idle", "on+busy": "off+busy"}.get(cond)
            rows.append(
                {
                    "task": task,
                    "regime": regime,
                    "condition": cond,
                    "steps_per_s": statistics.mean(sps),
                    "per_cycle": [round(s, 2) for s in sps],
                    "vs_off": ratio(cond, "off") if cond != "off" else [1.0] * len(sps),
                    "vs_base": ratio(cond, base) if base and by[base] else None,
                    "per_cpu_vs_off": ratio(cond, "off", "steps_per_cpu_s") if by["off"] else None,
                    "exchanges_per_s": statistics.mean(r["exchanges"] / r["window_s"] for r in by[cond]),
                    "mb_sent_per_s": statistics.mean(r["bytes_sent_per_s"] for r in by[cond]) / 1e6,
                    "p50_exchange_s": by[cond][-1]["p50_exchange_s"],
                    "cpu_a": statistics.mean(r["cpu_a"] for r in by[cond]),
                    "cpu_b": None if by[cond][0]["cpu_b"] is None else statistics.mean(r["cpu_b"] for r in by[cond]),
                }
            )
    return rows


def fmt_ratio(values: list[float] | None) -> str:
    return mean_and_range(values, ".1%", around=" ({}-{})")


def table(rows: list[dict]) -> str:
    out = [
        "| regime | task | condition | A steps/s | per cycle | vs off | vs its off+ | A exchanges/s | A MB sent/s "
        "| p50 exchange s | A cores | B cores | A steps per A CPU s, vs off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p50 = "-" if r["p50_exchange_s"] is None else f"{r['p50_exchange_s']:.3f}"
        cpu_b = "-" if r["cpu_b"] is None else f"{r['cpu_b']:.2f}"
        out.append(
            f"| {r['regime']} | {r['task']} | {r['condition']} | {r['steps_per_s']:.1f} "
            f"| {', '.join(f'{s:g}' for s in r['per_cycle'])} | {fmt_ratio(r['vs_off'])} | {fmt_ratio(r['vs_base'])} "
            f"| {r['exchanges_per_s']:.2f} | {r['mb_sent_per_s']:.2f} | {p50} | {r['cpu_a']:.2f} | {cpu_b} "
            f"| {fmt_ratio(r['per_cpu_vs_off'])} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        mine = [r for r in rows if r["regime"] == regime]
        tasks = list(dict.fromkeys(r["task"] for r in mine))
        conds = [c for c in CONDITIONS if any(r["condition"] == c for r in mine)]
        width = 0.8 / len(conds)
        for j, cond in enumerate(conds):
            xs, ys, errs = [], [], []
            for i, task in enumerate(tasks):
                r = next((r for r in mine if r["task"] == task and r["condition"] == cond), None)
                if r is not None:
                    v = [100 * x for x in r["vs_off"]]
                    xs.append(i + (j - (len(conds) - 1) / 2) * width)
                    ys.append(statistics.mean(v))
                    errs.append([[ys[-1] - min(v)], [max(v) - ys[-1]]])
            yerr = [[e[0][0] for e in errs], [e[1][0] for e in errs]]
            ax.bar(xs, ys, width, yerr=yerr, capsize=2, label=cond)
        ax.axhline(90, color="red", ls=":", lw=1, label="goal: 90% of off")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set(title=f"{regime}: node A's steps/s relative to off", ylabel="% of off (range over cycles)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def code_version(cwd: Path) -> str:
    """The gossipfl the nodes run (imported as they import it, from ``cwd``): a snapshot's COMMIT file, else
    the checkout's HEAD (+ dirty)."""
    where = subprocess.run(
        [sys.executable, "-c", "import gossipfl; print(gossipfl.__file__)"], cwd=cwd, capture_output=True, text=True
    )
    root = Path(where.stdout.strip()).resolve().parent.parent
    if (root / "COMMIT").exists():
        return (root / "COMMIT").read_text().strip() + f" (snapshot in {root})"
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "gossipfl"], capture_output=True, text=True
    )
    return head + (" with uncommitted changes in gossipfl/" if dirty.stdout.strip() else "")


def run_all(args: argparse.Namespace) -> list[dict]:
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for regime in args.regimes:
            tasks = args.tasks if regime == "flat-out" else [t for t in args.tasks if t in args.default_tasks]
            for task in tasks:
                big = task.startswith("synthetic:mb=") and float(task.split("=")[1]) >= 50
                window = args.big_window if big else args.window
                for cycle in range(args.cycles):
                    conds = DEFAULT_CONDITIONS[regime]
                    for cond in conds if cycle % 2 == 0 else conds[::-1]:
                        r = measure(task, regime, cond, argparse.Namespace(**{**vars(args), "window": window}), logs)
                        r["cycle"] = cycle
                        runs.append(r)
                        print(
                            f"{regime:8} {task:18} {cond:9} cycle {cycle}: {r['steps_per_s']:8.1f} steps/s, "
                            f"{r['exchanges']} exchanges, A {r['cpu_a']:.2f} cores, B {r['cpu_b']}, "
                            f"load {r['loadavg_1m']}",
                            flush=True,
                        )
    return runs


def write_report(runs: list[dict], meta: dict, name: str) -> str:
    rows = summarize(runs)
    a = meta["args"]
    loads = [r["loadavg_1m"] for r in runs]
    report = f"""# Training overhead: local steps per second with gossip on and off

Run {meta["started"]} on {meta["host"]}, loopback only: `{meta["command"]}`. Node code: {meta["code"]}.
The machine (2 cores) is shared with other work: the 1-minute load average during the measurements was
{min(loads):.1f}-{max(loads):.1f} (per measurement in {name}.json).

Node A trains on the whole training split of the task, with `--torch-threads 1 --join-wait 0
--eval-interval 3600`; B is a second node process of the same task (see the module docstring of
benchmarks/overhead.py for the conditions). Window {a["window"]:g} s ({a["big_window"]:g} s for
synthetic:mb >= 50) after {a["warmup"]:g} s of warm-up (and, with gossip on, after the first exchange);
{a["cycles"]} cycles, alternating order; ratios are paired within a cycle (mean, and range over cycles).
"vs its off+": on+idle against off+idle, on+busy against off+busy (the cost of the exchanges alone).
Cores: CPU seconds per second of A and of B during the window. The last column divides A's steps by
A's own CPU time: the CPU that A's side of the exchanges costs it, insensitive to what else runs on
the machine (it does not count B's side, nor time A's training waits for a merge to release the model);
it means something only in the flat-out regime: in the default one A is mostly asleep between rounds.

{table(rows)}

![steps per second relative to off]({name}.png)
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "runs": runs, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text(report)
    plot(rows, RESULTS / f"{name}.png")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["digits", "synthetic:mb=10", "synthetic:mb=100"])
    ap.add_argument("--regimes", nargs="+", default=["flat-out", "default"], choices=list(REGIMES))
    ap.add_argument("--default-tasks", nargs="+", default=["digits", "synthetic:mb=10"], help="tasks of 'default'")
    ap.add_argument("--cycles", type=int, default=2, help="cycles over the conditions (alternating order)")
    ap.add_argument("--window", type=float, default=8.0, help="seconds of counting (big models: see --big-window)")
    ap.add_argument("--big-window", type=float, default=15.0, help="window of synthetic:mb >= 50")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds after start (and the first exchange)")
    ap.add_argument("--port", type=int, default=19100, help="node A's port; B takes the next")
    ap.add_argument("--name", default="overhead")
    ap.add_argument("--logs", help="keep the node logs in this directory (default: a temporary one)")
    ap.add_argument("--report-only", action="store_true", help="rewrite NAME.md and NAME.png from NAME.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the nodes (finally) when stopped
    if args.report_only:
        print(write_report(*saved_runs(RESULTS / f"{args.name}.json"), args.name))
        return
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()})",
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "code": code_version(Path(tempfile.gettempdir())),
        "args": vars(args),
    }
    runs = run_all(args)
    print(write_report(runs, meta, args.name))


if __name__ == "__main__":
    main()

"""Tables, goals and the plot of benchmarks/exchange.py, from its json (also for ``--plot``)."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
ROWS = (
    "raw TCP one way",
    "raw TCP round trip",
    "GET /v1/model msgpack",
    "GET /v1/model safetensors",
    "gossipfl exchange",
    "pickle over HTTP",
    "torch.save over HTTP",
)
GOALS = (  # key, text, goal, higher is better
    ("serving_vs_tcp", "serving (msgpack) MB/s / raw TCP one-way MB/s", 0.40, True),
    ("exchange_vs_tcp", "exchange MB/s (2 x model / p50) / raw TCP both-ways MB/s", 0.20, True),
    ("speedup_vs_pickle", "pickle-over-HTTP p50 / exchange p50", 3.0, True),
    ("rss_multiple", "peak RSS above idle / model size (worse node of A, B)", 3.0, False),
)


def pct(xs: list[float], q: float) -> float:
    """Nearest rank, as the node's /v1/status: q=0.5 -> sorted[(n-1)//2]."""
    s = sorted(xs)
    return s[(len(s) - 1) // 2] if q == 0.5 else s[max(0, -(-round(q * 100) * len(s) // 100) - 1)]


def rows(size: dict) -> dict[str, dict]:
    """Per method: p50_s, p99_s, mean_s, mbps (model bytes moved / p50), above_mb, multiple, cpu_s (CPU seconds
    per transfer of the measured processes: server or node, plus the client's for the baselines; or None)."""
    n, out = size["model_bytes"], {}

    def put(
        name: str,
        times: list[float] | None,
        moved: int,
        memory: dict | None = None,
        cpu: float | None = None,
        **stats: float,
    ) -> None:
        if times is not None:
            stats = {"p50_s": pct(times, 0.5), "p99_s": pct(times, 0.99), "mean_s": sum(times) / len(times)}
        if not stats.get("p50_s"):
            return
        memory = memory or {}
        out[name] = {
            **stats,
            "mbps": moved / stats["p50_s"] / MiB,
            "above_mb": memory.get("above_idle_mb"),
            "multiple": memory.get("multiple"),
            "cpu_s": cpu,
        }

    raw = size.get("raw_tcp", {})
    if "one_way_s" in raw:
        put(ROWS[0], raw["one_way_s"], n)
        put(ROWS[1], raw["round_trip_s"], 2 * n)
    for fmt, name in (("msgpack", ROWS[2]), ("safetensors", ROWS[3])):
        if fmt in size.get("serving", {}):
            got = size["serving"][fmt]
            put(name, got["times_s"], n, got["memory"], got.get("cpu_s"))
    ex = size.get("exchange", {})
    if "a" in ex and ex["a"].get("p50_duration_s"):
        worse = max((ex["memory_a"], ex["memory_b"]), key=lambda m: m["multiple"])
        put(
            ROWS[4],
            None,
            2 * n,
            worse,
            ex["cpu_a_s"] + ex["cpu_b_s"] if "cpu_a_s" in ex else None,
            p50_s=ex["a"]["p50_duration_s"],
            p99_s=ex["a"]["p99_duration_s"],
            mean_s=ex["a"]["mean_duration_s"],
        )
    for key, name in (("pickle_http", ROWS[5]), ("torch_http", ROWS[6])):
        if "times_s" in size.get(key, {}):
            got = size[key]
            cpu = got["server_cpu_s"] + got["client_cpu_s"] if "server_cpu_s" in got else None
            put(name, got["times_s"], 2 * n, got["memory"], cpu)
    return out


def goals(size: dict) -> dict[str, float | None]:
    r = rows(size)

    def ratio(a: str, b: str, key: str = "mbps") -> float | None:
        return r[a][key] / r[b][key] if a in r and b in r else None

    ex = r.get(ROWS[4])
    return {
        "serving_vs_tcp": ratio(ROWS[2], ROWS[0]),
        "exchange_vs_tcp": ratio(ROWS[4], ROWS[1]),
        "speedup_vs_pickle": ratio(ROWS[5], ROWS[4], "p50_s"),
        "speedup_vs_torch": ratio(ROWS[6], ROWS[4], "p50_s"),
        "cpu_vs_pickle": ratio(ROWS[5], ROWS[4], "cpu_s") if ex and ex["cpu_s"] else None,
        "rss_multiple": ex["multiple"] if ex else None,
    }


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(res: dict) -> str:
    lines = [
        f"{'MB':>6} {'method':<26} {'p50 s':>9} {'p99 s':>9} {'MB/s':>9} {'RSS+ MB':>9} {'x model':>8} {'CPU s':>7}"
    ]
    for size in res["sizes"]:
        r = rows(size)
        for name in ROWS:
            if name in r:
                x = r[name]
                lines.append(
                    f"{size['mb']:>6g} {name:<26} {x['p50_s']:>9.4f} {x['p99_s']:>9.4f} {x['mbps']:>9.1f} "
                    f"{fmt(x['above_mb'], '.1f'):>9} {fmt(x['multiple'], '.2f'):>8} {fmt(x['cpu_s'], '.3f'):>7}"
                )
            else:
                lines.append(f"{size['mb']:>6g} {name:<26} {'FAILED':>9}")
    return "\n".join(lines)


def verdict(key: str, value: float | None) -> str:
    goal, higher = next((g, h) for k, _, g, h in GOALS if k == key)
    if value is None:
        return "not measured"
    return "pass" if (value >= goal if higher else value <= goal) else "**miss**"


def markdown(res: dict, before: dict | None = None, png: str = "exchange.png") -> str:
    m = res["machine"]
    nodes = m["nodes_checkout"]
    out = [
        "# One exchange over loopback: gossipfl against raw TCP, pickle and torch.save over HTTP",
        "",
        f"Machine: {m['cores']} cores, {m['mem_total_gb']} GB, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']}, aiohttp {m['aiohttp']}, numpy {m['numpy']}; everything over 127.0.0.1 between "
        "separate processes, on a machine shared with other work (load averages in the json).",
        f"Nodes ran from `{nodes['path']}` at {nodes['commit'][:10]} ({nodes['subject']})"
        + (
            f", with uncommitted changes in {', '.join(nodes.get('gossipfl_diff_files', ['gossipfl/']))}"
            if nodes["gossipfl_dirty"]
            else ""
        )
        + f". Load average at start {res['loadavg_start']}, at end {res['loadavg_end']}."
        + (f" Every node ran with `{res['node_args']}`." if res.get("node_args") else ""),
        "",
        "MB = 2^20 bytes of float32 parameters (`--task synthetic:mb=N`). MB/s = model bytes moved / p50 "
        "(both directions count for round trips and exchanges). RSS+ = peak RSS above the idle RSS of the "
        "server/node process (the worse of A and B for the exchange), and as a multiple of the model; "
        "safetensors is served by the same node after msgpack, its idle RSS read again in between. CPU s = CPU "
        "seconds (user + system, all threads) per GET of the serving node, per exchange of A + B, per exchange "
        "of the baseline's server + client: unlike the times, it hardly depends on what else the machine runs.",
        "",
        "| MB | method | p50 s | p99 s | MB/s | RSS+ MB | x model | CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in res["sizes"]:
        r = rows(size)
        for name in ROWS:
            x = r.get(name)
            if x is None:
                out.append(f"| {size['mb']:g} | {name} | failed | | | | | |")
                continue
            out.append(
                f"| {size['mb']:g} | {name} | {x['p50_s']:.4f} | {x['p99_s']:.4f} | {x['mbps']:.1f} | "
                f"{fmt(x['above_mb'], '.1f')} | {fmt(x['multiple'], '.2f')} | {fmt(x['cpu_s'], '.3f')} |"
            )
    out += [
        "",
        "## Exchange details (node A initiates, B answers)",
        "",
        "| MB | repeats | ok | aborted | failed | busy | sent/exchange MB | received/exchange MB | "
        "A RSS+ (x) | B RSS+ (x) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in res["sizes"]:
        ex = size.get("exchange", {})
        if "a" not in ex:
            out.append(f"| {size['mb']:g} | {size['repeats']} | {ex.get('error', 'failed')} | | | | | | | |")
            continue
        a, ma, mb_ = ex["a"], ex["memory_a"], ex["memory_b"]
        out.append(
            f"| {size['mb']:g} | {size['repeats']} | {a['ok']} | {a['aborted']} | {a['failed']} | {a['busy']} | "
            f"{ex['bytes_sent_per_exchange'] / MiB:.2f} | {ex['bytes_received_per_exchange'] / MiB:.2f} | "
            f"{ma['above_idle_mb']:.0f} ({ma['multiple']:.2f}) | {mb_['above_idle_mb']:.0f} "
            f"({mb_['multiple']:.2f}) |"
        )
    out += [
        "",
        "## Goals of issue 18 (stated at 100 MB)",
        "",
        "| MB | " + " | ".join(t for _, t, _, _ in GOALS) + " | torch.save p50 / exchange p50 | "
        "pickle CPU / exchange CPU |",
        "|---:|" + "---|" * (len(GOALS) + 2),
    ]
    for size in res["sizes"]:
        g = goals(size)
        cells = [f"{fmt(g[k], '.2f')} ({'≥' if h else '≤'} {goal:g}: {verdict(k, g[k])})" for k, _, goal, h in GOALS]
        extra = f" | {fmt(g['speedup_vs_torch'], '.2f')} | {fmt(g['cpu_vs_pickle'], '.2f')} |"
        out.append(f"| {size['mb']:g} | " + " | ".join(cells) + extra)
    if before:
        out += compare(before, res)
    out += ["", f"![throughput and memory]({png})", ""]
    return "\n".join(out)


def compare(before: dict, after: dict) -> list[str]:
    out = [
        "",
        f"## Before ({before['machine']['nodes_checkout']['commit'][:10]}) and after "
        f"({after['machine']['nodes_checkout']['commit'][:10]}), paired by size",
        "",
        "| MB | exchange p50 s | exchange MB/s | / raw TCP both ways | serving MB/s | / raw TCP one way | "
        "RSS+ x model | pickle p50 / exchange p50 | exchange CPU s (A + B) |",
        "|---:|---|---|---|---|---|---|---|---|",
    ]
    old = {s["mb"]: s for s in before["sizes"]}
    for size in after["sizes"]:
        if size["mb"] not in old:
            continue
        rb, ra, gb, ga = rows(old[size["mb"]]), rows(size), goals(old[size["mb"]]), goals(size)

        def pair(r0: dict, r1: dict, name: str, key: str, spec: str) -> str:
            return f"{fmt(r0.get(name, {}).get(key), spec)} → {fmt(r1.get(name, {}).get(key), spec)}"

        out.append(
            f"| {size['mb']:g} | {pair(rb, ra, ROWS[4], 'p50_s', '.3f')} | {pair(rb, ra, ROWS[4], 'mbps', '.0f')} "
            f"| {fmt(gb['exchange_vs_tcp'], '.2f')} → {fmt(ga['exchange_vs_tcp'], '.2f')} "
            f"| {pair(rb, ra, ROWS[2], 'mbps', '.0f')} "
            f"| {fmt(gb['serving_vs_tcp'], '.2f')} → {fmt(ga['serving_vs_tcp'], '.2f')} "
            f"| {fmt(gb['rss_multiple'], '.2f')} → {fmt(ga['rss_multiple'], '.2f')} "
            f"| {fmt(gb['speedup_vs_pickle'], '.2f')} → {fmt(ga['speedup_vs_pickle'], '.2f')} "
            f"| {pair(rb, ra, ROWS[4], 'cpu_s', '.3f')} |"
        )
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    table_ = [(s["mb"], rows(s)) for s in res["sizes"]]
    for name, style in zip(ROWS, ("k--", "k:", "C0-o", "C0--s", "C3-o", "C1-^", "C2-v"), strict=True):
        pts = [(mb, r[name]["mbps"]) for mb, r in table_ if name in r]
        if pts:
            ax1.plot(*zip(*pts, strict=True), style, label=name)
        if name not in ROWS[:2]:
            pts = [(mb, r[name]["multiple"]) for mb, r in table_ if name in r and r[name]["multiple"] is not None]
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, label=name + (" (worse node)" if name == ROWS[4] else ""))
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="model size, MB",
        ylabel="MB/s (model bytes moved / p50)",
        title="Throughput over loopback",
    )
    ax2.axhline(3, color="grey", lw=0.8, ls="--", label="goal: 3x")
    ax2.set(
        xscale="log",
        xlabel="model size, MB",
        ylabel="peak RSS above idle / model size",
        title="Peak memory of the serving process",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"{m['cores']} cores, loopback; nodes at {m['nodes_checkout']['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

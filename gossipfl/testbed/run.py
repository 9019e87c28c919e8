"""``run_testbed``: launch, wait until every node is ready and knows the others, sample until the
duration is over, stop, write the results."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

from gossipfl.learning.learner import build_seeded, gossiped_tensors
from gossipfl.learning.registry import get_task
from gossipfl.monitor.app import DashboardServer
from gossipfl.monitor.collector import Collector
from gossipfl.protocol import wire
from gossipfl.testbed.forked import ForkedProcessLauncher
from gossipfl.testbed.launchers import InprocLauncher, ProcessLauncher
from gossipfl.testbed.observe import Display, sample, wait_ready
from gossipfl.testbed.options import (
    DISCOVERY_TIMEOUT_S,
    MODES,
    Launcher,
    TestbedOptions,
    WatchedNode,
)
from gossipfl.testbed.plot import SKIPPED, plot_convergence
from gossipfl.testbed.report import final_table, summarize


async def run_testbed(opts: TestbedOptions) -> int:
    t_launch = time.monotonic()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(opts, out)
    task = get_task(opts.task, opts.data)
    model = build_seeded(task.build_model, 0)
    spec = wire.spec_of({k: v.detach().numpy() for k, v in gossiped_tensors(model).items()})
    tag = secrets.token_hex(2)
    ids = [f"node{i}-{tag}" for i in range(opts.nodes)]
    nodes: list[WatchedNode] = []
    series: list[dict] = []
    exit_codes: dict[str, int | None] = {}
    startup_s = None
    failure = None
    dashboard = None
    try:
        nodes = await launcher.start(ids, f"testbed-{tag}")
        print(
            f"testbed: started {opts.nodes} nodes ({opts.task}, {launcher.where}), waiting for them to be up...",
            flush=True,
        )
        dashboard = await start_dashboard(opts, nodes)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            found = await wait_ready(session, nodes, launcher)
            startup_s = time.monotonic() - t_launch
            if found:
                print(
                    f"testbed: all {opts.nodes} nodes up and know each other after {startup_s:.1f} s; "
                    f"running for {opts.duration:g} s",
                    flush=True,
                )
            else:
                print(
                    f"testbed: all {opts.nodes} nodes up, but not all found each other in "
                    f"{DISCOVERY_TIMEOUT_S:.0f} s; running for {opts.duration:g} s anyway",
                    flush=True,
                )
            with Display(opts.duration, live=opts.live, tty=sys.stdout.isatty()) as display:
                series = await watch(session, nodes, spec, opts, showing(display.show, dashboard))
    except RuntimeError as e:  # a node died or never came up, or the dashboard's port was taken
        failure = str(e)
    finally:
        if dashboard is not None:
            await dashboard.stop()
        exit_codes = await launcher.stop()
    if failure:
        print(f"testbed: error: {failure}", file=sys.stderr)
        return 1
    resources = {"mode": opts.mode, "wall_s": round(time.monotonic() - t_launch, 2), **launcher.resources()}
    result = summarize(nodes, series, opts, exit_codes, startup_s=startup_s, resources=resources)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("\n" + final_table(result))
    if opts.mode == "inproc":
        r = resources
        print(
            f"testbed: {opts.nodes} nodes in one process ({r['workers']} worker threads): "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, CPU {r['cpu_user_s'] + r['cpu_system_s']:.1f} s "
            f"(user {r['cpu_user_s']:.1f}, system {r['cpu_system_s']:.1f}) in {r['wall_s']:.1f} s wall"
        )
    print(f"testbed: results in {out / 'results.json'}")
    png = plot_convergence(result, out / "convergence.png")
    print(f"testbed: convergence plot in {png}" if png else SKIPPED)
    bad = {k: v for k, v in exit_codes.items() if v != 0}
    if bad:
        print(f"testbed: nodes did not exit cleanly: {bad}", file=sys.stderr)
        return 1
    return 0


async def watch(
    session: aiohttp.ClientSession,
    nodes: list[WatchedNode],
    spec: wire.ModelSpec,
    opts: TestbedOptions,
    show: Callable[[list[WatchedNode], dict], None],
) -> list[dict]:
    """Sample every node each sample interval until the duration is over; each row goes to ``show`` as it
    is taken. Returns the rows (time since the first sample, consensus distance, ...)."""
    series: list[dict] = []
    t0 = time.monotonic()
    mean0 = None
    while True:
        t = time.monotonic() - t0
        row, mean = await sample(session, nodes, spec, t)
        if mean0 is None and mean is not None:
            mean0 = mean
        if mean is not None and mean0 is not None:
            row["mean_shift_relative"] = float(np.linalg.norm(mean - mean0) / np.linalg.norm(mean0))
        series.append(row)
        show(nodes, row)
        if t >= opts.duration:
            return series
        await asyncio.sleep(max(0.0, opts.sample_interval - (time.monotonic() - t0 - t)))


async def start_dashboard(opts: TestbedOptions, nodes: list[WatchedNode]) -> DashboardServer | None:
    """With --dashboard-port: the network view of the testbed's nodes on 127.0.0.1 (gossipfl dashboard's page),
    its consensus distance the testbed's own (``showing``), so no model is read twice."""
    if opts.dashboard_port is None:
        return None
    collector = Collector([n.url for n in nodes], interval=min(2.0, opts.sample_interval), models=False)
    server = DashboardServer(collector, port=opts.dashboard_port)
    try:
        url = await server.start()
    except OSError as e:
        raise RuntimeError(f"cannot serve the dashboard on port {opts.dashboard_port}: {e.strerror or e}") from None
    print(f"testbed: dashboard at {url}", flush=True)
    return server


def showing(
    show: Callable[[list[WatchedNode], dict], None], dashboard: DashboardServer | None
) -> Callable[[list[WatchedNode], dict], None]:
    """``show``, and with a dashboard, each sample's consensus distance handed to its collector too."""
    if dashboard is None:
        return show

    def both(nodes: list[WatchedNode], row: dict) -> None:
        show(nodes, row)
        distance, norm = row["consensus_distance"], row.get("mean_norm")
        relative = distance / norm if distance is not None and norm else None
        dashboard.collector.add_consensus(time.time(), distance, relative, row["nodes_sampled"])

    return both


def make_launcher(opts: TestbedOptions, out: Path) -> Launcher:
    if opts.mode == "process":
        if opts.fork:
            return ForkedProcessLauncher(opts, out)
        return ProcessLauncher(opts, out)
    if opts.mode == "inproc":
        return InprocLauncher(opts, out)
    raise ValueError(f"testbed mode {opts.mode!r}: expected one of {', '.join(MODES)}")

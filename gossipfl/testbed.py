"""Local testbed: N node processes on 127.0.0.1 with mDNS confined to loopback, watched over HTTP.

Every sample interval it reads each node's /v1/status and /v1/model, records accuracy and the
consensus distance (how far the models are from their mean), and draws a live table. At the end it
stops the nodes with SIGTERM and writes ``results.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from . import wire
from .consensus import consensus_distance, flatten, network_mean
from .learning.learner import build_seeded
from .learning.registry import get_task

READY_TIMEOUT_S = 90.0
DISCOVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TestbedOptions:
    nodes: int = 8
    duration: float = 60.0
    out: str = "results/testbed"
    no_train: bool = False
    gossip_interval: float = 1.0
    sample_interval: float = 1.0
    task: str = "digits"
    seed: int = 0
    live: bool = True
    extra_node_args: tuple[str, ...] = ()


@dataclass
class NodeProc:
    index: int
    id: str
    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    url: str = ""
    accuracy: list[tuple[float, float | None]] = field(default_factory=list)
    loss: list[tuple[float, float | None]] = field(default_factory=list)
    last_status: dict[str, Any] = field(default_factory=dict)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_command(opts: TestbedOptions, index: int, node_id: str, port: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "gossipfl",
        "node",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--id",
        node_id,
        "--mdns-interface",
        "127.0.0.1",
        "--task",
        opts.task,
        "--partition",
        f"{index}/{opts.nodes}",
        "--seed",
        str(opts.seed + index),
        "--gossip-interval",
        str(opts.gossip_interval),
    ]
    if opts.no_train:
        cmd.append("--no-train")
    return cmd + list(opts.extra_node_args)


async def _status(session: aiohttp.ClientSession, node: NodeProc) -> dict | None:
    try:
        async with session.get(node.url + "/v1/status") as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def wait_ready(session: aiohttp.ClientSession, nodes: list[NodeProc]) -> bool:
    """Wait until every node answers HTTP, then (up to a limit) until each has found all the others.

    Returns whether discovery completed; raises when a node dies or never answers."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(nodes)
    while pending:
        for n in pending:
            if n.proc.returncode is not None:
                raise RuntimeError(f"{n.id} exited with code {n.proc.returncode} during start-up; see {n.log_path}")
        statuses = await asyncio.gather(*(_status(session, n) for n in pending))
        pending = [n for n, st in zip(pending, statuses, strict=True) if st is None]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"nodes not ready after {READY_TIMEOUT_S:.0f} s: {[n.id for n in pending]}")
        if pending:
            await asyncio.sleep(0.3)
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = await asyncio.gather(*(_status(session, n) for n in nodes))
        if all(st is not None and len(st.get("peers", [])) >= len(nodes) - 1 for st in statuses):
            return True
        await asyncio.sleep(0.2)
    return False


async def sample(
    session: aiohttp.ClientSession, nodes: list[NodeProc], spec: wire.ModelSpec, t: float
) -> tuple[dict, np.ndarray | None]:
    """Read every node's status and model; return one row of the time series and the network mean."""

    async def one(n: NodeProc) -> np.ndarray | None:
        try:
            async with session.get(n.url + "/v1/status") as r:
                n.last_status = await r.json()
            async with session.get(n.url + "/v1/model") as r:
                body = await r.read()
            metrics = n.last_status.get("metrics", {})
            n.accuracy.append((t, metrics.get("accuracy")))
            n.loss.append((t, metrics.get("loss")))
            return flatten(wire.decode(body, spec).params)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    vectors = [v for v in await asyncio.gather(*(one(n) for n in nodes)) if v is not None]
    accs = [n.accuracy[-1][1] for n in nodes if n.accuracy and n.accuracy[-1][1] is not None]
    row = {
        "t": round(t, 3),
        "consensus_distance": consensus_distance(vectors) if len(vectors) > 1 else None,
        "mean_norm": float(np.linalg.norm(network_mean(vectors))) if vectors else None,
        "nodes_sampled": len(vectors),
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_min": float(np.min(accs)) if accs else None,
    }
    return row, (network_mean(vectors) if vectors else None)


def render(nodes: list[NodeProc], row: dict, duration: float) -> str:
    cd = row["consensus_distance"]
    lines = [
        f"t={row['t']:5.1f}/{duration:.0f}s  consensus distance={cd:.3e}" if cd is not None else f"t={row['t']:.1f}s",
        f"{'node':<16} {'accuracy':>8} {'loss':>7} {'age':>6} {'peers':>5} {'ok':>5} {'fail':>4} {'busy':>4}",
    ]
    for n in nodes:
        s = n.last_status
        m, ex = s.get("metrics", {}), s.get("exchanges", {})
        acc = f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "-"
        loss = f"{m['loss']:.3f}" if m.get("loss") is not None else "-"
        lines.append(
            f"{n.id:<16} {acc:>8} {loss:>7} {s.get('age', 0):>6} {len(s.get('peers', [])):>5} "
            f"{ex.get('ok', 0):>5} {ex.get('failed', 0):>4} {ex.get('busy', 0):>4}"
        )
    return "\n".join(lines)


async def stop_nodes(nodes: list[NodeProc]) -> dict[str, int | None]:
    for n in nodes:
        if n.proc.returncode is None:
            n.proc.send_signal(signal.SIGTERM)

    async def wait(n: NodeProc) -> int | None:
        try:
            return await asyncio.wait_for(n.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            n.proc.kill()
            await n.proc.wait()
            return None  # did not stop in time

    codes = await asyncio.gather(*(wait(n) for n in nodes))
    return {n.id: c for n, c in zip(nodes, codes, strict=True)}


def summarize(nodes: list[NodeProc], series: list[dict], opts: TestbedOptions, exit_codes: dict) -> dict:
    final = {}
    for n in nodes:
        s = n.last_status
        final[n.id] = {
            "accuracy": s.get("metrics", {}).get("accuracy"),
            "loss": s.get("metrics", {}).get("loss"),
            "age": s.get("age"),
            "peers": len(s.get("peers", [])),
            "exchanges": s.get("exchanges"),
            "exit_code": exit_codes.get(n.id),
        }
    accs = [f["accuracy"] for f in final.values() if f["accuracy"] is not None]
    first = next((r for r in series if r["consensus_distance"] is not None), None)
    last = series[-1] if series else None
    return {
        "options": asdict(opts),
        "nodes": {
            n.id: {"url": n.url, "partition": f"{n.index}/{opts.nodes}", "accuracy": n.accuracy, "loss": n.loss}
            for n in nodes
        },
        "consensus": series,
        "final": final,
        "summary": {
            "accuracy_mean": float(np.mean(accs)) if accs else None,
            "accuracy_min": float(np.min(accs)) if accs else None,
            "accuracy_max": float(np.max(accs)) if accs else None,
            "accuracy_spread": float(np.max(accs) - np.min(accs)) if accs else None,
            "consensus_distance_first": first["consensus_distance"] if first else None,
            "consensus_distance_last": last["consensus_distance"] if last else None,
            # only meaningful for pure averaging: training moves the mean on purpose
            "mean_shift_relative": series[-1].get("mean_shift_relative") if series and opts.no_train else None,
            "all_exited_cleanly": all(c == 0 for c in exit_codes.values()),
        },
    }


def final_table(result: dict) -> str:
    lines = [f"{'node':<16} {'accuracy':>8} {'loss':>7} {'exchanges ok':>12} {'exit':>4}"]
    for node_id, f in result["final"].items():
        acc = f"{f['accuracy']:.4f}" if f["accuracy"] is not None else "-"
        loss = f"{f['loss']:.3f}" if f["loss"] is not None else "-"
        ok = (f["exchanges"] or {}).get("ok", 0)
        lines.append(f"{node_id:<16} {acc:>8} {loss:>7} {ok:>12} {f['exit_code']!s:>4}")
    s = result["summary"]
    if s["accuracy_mean"] is not None:
        lines.append(
            f"accuracy mean {s['accuracy_mean']:.4f}  min {s['accuracy_min']:.4f}  "
            f"max {s['accuracy_max']:.4f}  spread {s['accuracy_spread']:.4f}"
        )
    if s["consensus_distance_first"] is not None and s["consensus_distance_last"] is not None:
        lines.append(f"consensus distance {s['consensus_distance_first']:.3e} -> {s['consensus_distance_last']:.3e}")
    return "\n".join(lines)


async def run_testbed(opts: TestbedOptions) -> int:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(opts.task)
    spec = wire.spec_of({k: v.detach().numpy() for k, v in build_seeded(task.build_model, 0).named_parameters()})
    tag = secrets.token_hex(2)
    nodes: list[NodeProc] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, port in enumerate(free_ports(opts.nodes)):
        node_id = f"node{i}-{tag}"
        log_path = out / f"{node_id}.log"
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *node_command(opts, i, node_id, port),
                stdout=log_file,
                stderr=log_file,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        nodes.append(NodeProc(i, node_id, port, proc, log_path, url=f"http://127.0.0.1:{port}"))
    print(
        f"testbed: started {opts.nodes} nodes ({opts.task}, logs in {out}/), waiting for them to be up...", flush=True
    )
    series: list[dict] = []
    exit_codes: dict[str, int | None] = {}
    tty = sys.stdout.isatty() and opts.live
    failure = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            if await wait_ready(session, nodes):
                print(f"testbed: all {opts.nodes} nodes up and know each other; running for {opts.duration:g} s")
            else:
                print(
                    f"testbed: all {opts.nodes} nodes up, but not all found each other in "
                    f"{DISCOVERY_TIMEOUT_S:.0f} s; running for {opts.duration:g} s anyway",
                    flush=True,
                )
            t0 = time.monotonic()
            mean0 = None
            last_print = -1e9
            while True:
                t = time.monotonic() - t0
                row, mean = await sample(session, nodes, spec, t)
                if mean0 is None and mean is not None:
                    mean0 = mean
                if mean is not None and mean0 is not None:
                    row["mean_shift_relative"] = float(np.linalg.norm(mean - mean0) / np.linalg.norm(mean0))
                series.append(row)
                if opts.live and (tty or t - last_print >= 5.0):
                    text = render(nodes, row, opts.duration)
                    print(("\x1b[H\x1b[2J" if tty else "\n") + text, flush=True)
                    last_print = t
                if t >= opts.duration:
                    break
                await asyncio.sleep(max(0.0, opts.sample_interval - (time.monotonic() - t0 - t)))
    except RuntimeError as e:  # a node died or never came up
        failure = str(e)
    finally:
        exit_codes = await stop_nodes(nodes)
    if failure:
        print(f"testbed: error: {failure}", file=sys.stderr)
        return 1
    result = summarize(nodes, series, opts, exit_codes)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("\n" + final_table(result))
    print(f"testbed: results in {out / 'results.json'}")
    bad = {k: v for k, v in exit_codes.items() if v != 0}
    if bad:
        print(f"testbed: nodes did not exit cleanly: {bad}", file=sys.stderr)
        return 1
    return 0

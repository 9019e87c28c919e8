"""Watching nodes over HTTP only: readiness, one sample of every node (accuracy, consensus distance,
bytes), and the live table."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np

from gossipfl.protocol import wire
from gossipfl.protocol.consensus import consensus_distance, flatten, network_mean
from gossipfl.testbed.options import (
    DISCOVERY_TIMEOUT_S,
    READY_TIMEOUT_S,
    Launcher,
    WatchedNode,
)


async def _status(session: aiohttp.ClientSession, node: WatchedNode) -> dict | None:
    try:
        async with session.get(node.url + "/v1/status") as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def wait_ready(session: aiohttp.ClientSession, nodes: list[WatchedNode], launcher: Launcher) -> bool:
    """Wait until every node answers HTTP, then (up to a limit) until each has found all the others.

    Returns whether discovery completed; raises when a node dies or never answers."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(nodes)
    while pending:
        launcher.check()
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
    session: aiohttp.ClientSession, nodes: list[WatchedNode], spec: wire.ModelSpec, t: float
) -> tuple[dict, np.ndarray | None]:
    """Read every node's status and model; return one row of the time series and the network mean."""

    async def one(n: WatchedNode) -> np.ndarray | None:
        try:
            async with session.get(n.url + "/v1/status") as r:
                n.last_status = await r.json()
            async with session.get(n.url + "/v1/model") as r:
                body = await r.read()
            metrics = n.last_status.get("metrics", {})
            n.accuracy.append((t, metrics.get("accuracy")))
            n.loss.append((t, metrics.get("loss")))
            n.bytes_sent.append((t, int(n.last_status.get("exchanges", {}).get("bytes_sent", 0))))
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


def render(nodes: list[WatchedNode], row: dict, duration: float) -> str:
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

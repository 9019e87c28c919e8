"""Watching nodes over HTTP only: readiness, one sample of every node (accuracy, consensus distance,
bytes), and the live table (rich, redrawn in place, on a terminal; plain text every few seconds otherwise)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

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

    answers = await asyncio.gather(*(one(n) for n in nodes))
    vectors = [v for v in answers if v is not None]
    accs = [n.accuracy[-1][1] for n in nodes if n.accuracy and n.accuracy[-1][1] is not None]
    row = {
        "t": round(t, 3),
        "consensus_distance": consensus_distance(vectors) if len(vectors) > 1 else None,
        "mean_norm": float(np.linalg.norm(network_mean(vectors))) if vectors else None,
        "nodes_sampled": len(vectors),
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_min": float(np.min(accs)) if accs else None,
        "unreachable": [n.id for n, v in zip(nodes, answers, strict=True) if v is None],
    }
    return row, (network_mean(vectors) if vectors else None)


def render(nodes: list[WatchedNode], row: dict, duration: float) -> str:
    """The plain-text table of one sample (what a pipe or a log gets)."""
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


def _rate(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    for unit, scale in (("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.1f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def live_view(nodes: list[WatchedNode], row: dict, duration: float) -> Group:
    """One sample as rich renders it: a header (time, consensus distance; mean accuracy) over a table with
    a row per node; a node that did not answer this sample shows as unreachable."""
    cd, norm, acc = row["consensus_distance"], row.get("mean_norm"), row.get("accuracy_mean")
    head = Text(f"t={row['t']:5.1f}/{duration:.0f} s", style="bold")
    if cd is not None:
        head.append(f"   consensus distance {cd:.3e}")
        if norm:
            head.append(f" ({100 * cd / norm:.2g}% of the mean model's norm)")
    if acc is not None:  # a line of its own: the header fits 80 columns
        head.append(f"\naccuracy mean {acc:.4f}  min {row['accuracy_min']:.4f}")
    missing = set(row.get("unreachable", ()))
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("node")
    for name in ("accuracy", "loss", "age", "peers", "ok", "fail", "busy", "upload"):
        table.add_column(name, justify="right")
    for n in nodes:
        if n.id in missing:
            table.add_row(n.id, "unreachable", style="red")
            continue
        s: dict[str, Any] = n.last_status
        m, ex = s.get("metrics", {}), s.get("exchanges", {})
        table.add_row(
            n.id,
            f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "-",
            f"{m['loss']:.3f}" if m.get("loss") is not None else "-",
            str(s.get("age", 0)),
            str(len(s.get("peers", []))),
            str(ex.get("ok", 0)),
            str(ex.get("failed", 0)),
            str(ex.get("busy", 0)),
            _rate(s.get("upload", {}).get("rate_bytes_per_s")),
        )
    if missing:
        table.caption = f"{len(missing)} of {len(nodes)} nodes unreachable in this sample"
    return Group(head, table)


PLAIN_EVERY_S = 5.0


class Display:
    """Where each sample goes: on a terminal a rich Live table redrawn in place; otherwise (a pipe, CI) the
    plain table every PLAIN_EVERY_S seconds; nothing when not ``live`` (--quiet). Use it as a context
    manager: the Live display ends with the block, before the final table is printed."""

    def __init__(self, duration: float, *, live: bool, tty: bool, console: Console | None = None) -> None:
        self.duration = duration
        self.live = live
        self._rich = Live(console=console, auto_refresh=False, transient=False) if live and tty else None
        self._last_plain = -float("inf")

    def __enter__(self) -> Display:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def show(self, nodes: list[WatchedNode], row: dict) -> None:
        if self._rich is not None:
            self._rich.update(live_view(nodes, row, self.duration), refresh=True)
        elif self.live and row["t"] - self._last_plain >= PLAIN_EVERY_S:
            print("\n" + render(nodes, row, self.duration), flush=True)
            self._last_plain = row["t"]

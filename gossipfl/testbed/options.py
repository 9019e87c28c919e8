"""What a testbed runs: its options, the nodes it watches, and each node's command line."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from gossipfl.config import GOSSIP_INTERVAL_S

LOOPBACK = "127.0.0.1"
MODES = ("process", "inproc")
READY_TIMEOUT_S = 90.0
DISCOVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TestbedOptions:
    nodes: int = 8
    duration: float = 60.0
    out: str = "results/testbed"
    no_train: bool = False
    gossip_interval: float = GOSSIP_INTERVAL_S
    sample_interval: float = 1.0
    task: str = "digits"
    data: str | None = None  # --data of every node (tabular or a user's task): one file, cut by --partition
    seed: int = 0
    live: bool = True
    extra_node_args: tuple[str, ...] = ()
    mode: str = "process"  # one of MODES
    inproc_workers: int = 0  # inproc: threads of the loop's default executor; 0 picks inproc_workers()
    fork: bool = True  # process: fork node processes from a zygote that imported torch once (zygote.py)
    dashboard_port: int | None = None  # serve the network view on 127.0.0.1 at this port (0: a free one)


@dataclass
class WatchedNode:
    """A node as the testbed watches it: over HTTP only, whatever runs it."""

    index: int
    id: str
    url: str = ""
    accuracy: list[tuple[float, float | None]] = field(default_factory=list)
    loss: list[tuple[float, float | None]] = field(default_factory=list)
    bytes_sent: list[tuple[float, int]] = field(default_factory=list)
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


def node_args(opts: TestbedOptions, index: int, node_id: str, port: int, cluster: str) -> list[str]:
    """The ``gossipfl node`` options of node ``index``: the command line in process mode, parsed by the
    same parser into a NodeConfig in inproc mode."""
    args = [
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--id",
        node_id,
        "--mdns-interface",
        LOOPBACK,
        "--task",
        opts.task,
        "--partition",
        f"{index}/{opts.nodes}",
        "--seed",
        str(opts.seed + index),
        "--gossip-interval",
        str(opts.gossip_interval),
        "--cluster",  # a run of its own: other testbeds or nodes on this host stay out
        cluster,
    ]
    if opts.data is not None:
        args += ["--data", opts.data]
    if opts.no_train:
        args.append("--no-train")
    return args + list(opts.extra_node_args)


def node_command(opts: TestbedOptions, index: int, node_id: str, port: int, cluster: str) -> list[str]:
    return [sys.executable, "-m", "gossipfl", "node", *node_args(opts, index, node_id, port, cluster)]


class Launcher(Protocol):
    """What differs between the modes: starting the nodes, noticing one died, stopping them."""

    mode: str
    where: str  # where the node logs go, for the start-up line

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        """Start one node per id (node i gets shard i); return them once launched."""
        ...

    def check(self) -> None:
        """Raise RuntimeError naming a node that has died (called while waiting for start-up)."""
        ...

    async def stop(self) -> dict[str, int | None]:
        """Stop every node; node id -> exit code (0: clean, None: did not stop in time)."""
        ...

    def resources(self) -> dict[str, Any]:
        """CPU time and peak memory of the run, measured after stop()."""
        ...

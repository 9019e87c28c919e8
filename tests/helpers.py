"""Helpers for tests: node configs on loopback, running nodes, building messages."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer
from zeroconf.asyncio import AsyncZeroconf

from gossipfl.config import NodeConfig
from gossipfl.node import Node
from gossipfl.protocol import wire
from gossipfl.protocol.consensus import consensus_distance, flatten

LOOPBACK = "127.0.0.1"


def node_config(**overrides: object) -> NodeConfig:
    base: dict[str, object] = dict(
        host=LOOPBACK,
        port=0,
        mdns_interface=(LOOPBACK,),
        discovery=("static",),
        gossip_interval=0.3,
        eval_interval=0.5,
        train_interval=0.05,
    )
    base.update(overrides)
    if "id" not in base:
        base["id"] = f"t-{uuid.uuid4().hex[:8]}"
    return NodeConfig(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    *configs: NodeConfig, zeroconf: AsyncZeroconf | None = None, task: object = None
) -> AsyncIterator[list[Node]]:
    nodes = [Node(c, zeroconf=zeroconf, task=task) for c in configs]  # type: ignore[arg-type]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on 127.0.0.1 (a free port) while the block runs: its base URL, without a final slash."""
    server = TestServer(app, host=LOOPBACK)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def params_of(node: Node) -> dict[str, np.ndarray]:
    return node.learner.snapshot().params


def spread(nodes: list[Node]) -> float:
    return consensus_distance([flatten(params_of(n)) for n in nodes])


def message(node: Node, params: dict[str, np.ndarray] | None = None, **fields: object) -> bytes:
    state = node.learner.snapshot()
    msg = wire.GossipMessage(
        sender=str(fields.get("sender", "tester")),
        age=int(fields.get("age", 0)),  # type: ignore[arg-type]
        params=params if params is not None else state.params,
        task=fields.get("task", node.task.name),  # type: ignore[arg-type]
        xid=str(fields.get("xid", wire.new_xid())),
    )
    return wire.encode(msg).tobytes()


async def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def settled(*nodes: Node, timeout: float = 10.0) -> None:
    """Until no node has an exchange task running (a responder applies a commit just after answering)."""
    assert await wait_for(lambda: not any(n.gossiper.tasks for n in nodes), timeout, interval=0.01)

"""What the routes need from a node, and nothing more: a narrow structural interface that ``Node``
satisfies (routes never import it), and the application key under which they find it."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from gossipfl.common.chunks import Chunks
from gossipfl.serving.metrics import NodeMetrics
from gossipfl.serving.predict import Signature


class Named(Protocol):
    @property
    def name(self) -> str: ...


class GossipResponder(Protocol):
    """The responder side of the exchange (``protocol.gossiper.Gossiper``)."""

    @property
    def max_body(self) -> int: ...
    def reserve(self, retry_of: str | None = None) -> bool: ...
    def refusal(self) -> str: ...  # why ``reserve`` said no
    def release(self) -> None: ...
    async def prepare(
        self,
        body: bytes | bytearray,
        remote: str | None = None,
        member: str | None = None,
        retry_of: str | None = None,
    ) -> Chunks: ...
    async def decide(self, xid: str, decision: str, member: str | None = None) -> tuple[str, str]: ...


class GroupResponder(Protocol):
    """A member's side of secure group rounds (``protocol.group.SecureGroup``)."""

    @property
    def max_body(self) -> int: ...
    async def invite(self, body: bytes, member: str | None, remote: str | None = None) -> bytes: ...
    def hello(self, body: bytes, member: str | None, remote: str | None) -> None: ...
    async def mask(self, round_id: str, body: bytes, member: str | None) -> bytes: ...
    async def commit(self, round_id: str, body: bytes, member: str | None) -> tuple[str, str]: ...
    def abort(self, round_id: str, member: str | None) -> tuple[str, str]: ...


class PeerListing(Protocol):
    """The peer table as ``/v1/peers`` shows it (``discovery.peers.PeerTable``)."""

    def working(self) -> Any: ...
    def describe(self, peers: Any = ...) -> list[dict[str, Any]]: ...


class NodeView(Protocol):
    """A node as its HTTP routes see it."""

    @property
    def id(self) -> str: ...
    @property
    def task(self) -> Named: ...
    @property
    def signature(self) -> Signature: ...  # the served model's input and output tensors
    @property
    def metrics(self) -> NodeMetrics: ...
    @property
    def gossiper(self) -> GossipResponder: ...
    @property
    def peers(self) -> PeerListing: ...
    @property
    def group(self) -> GroupResponder | None: ...  # secure group rounds (--secure-group), None: pairwise
    @property
    def ready(self) -> bool: ...  # the served model was trained or merged at least once
    @property
    def inference_slots(self) -> asyncio.Semaphore: ...  # inference requests running at once
    @property
    def inference_uploads(self) -> asyncio.Semaphore: ...  # inference bodies being received at once

    def status(self) -> dict[str, Any]: ...
    def history(self, evals_after: int = 0, exchanges_after: int = 0) -> dict[str, Any]: ...
    async def model_payload(self) -> bytes: ...  # the working model as a gossip message
    async def model_file(self) -> bytes: ...  # the served model as safetensors
    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    async def model_is_finite(self) -> bool: ...


NODE_KEY: web.AppKey[NodeView] = web.AppKey("node")

"""The gossip protocol: push-pull exchanges, merged with the node's rule (default: averaging).

Initiator: snapshot parameters, POST them to a random peer's /v1/gossip, receive the peer's pre-merge
parameters, set its own to the merge of both. Responder: on a valid message, reply with its pre-merge
parameters and set its own to the same merge in one atomic step (rules are symmetric, see merge.py).
A node takes part in one exchange at a time; a busy node answers 409 and the initiator moves on to
its next round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from . import merge, wire
from .httpio import TooLarge, read_limited
from .learning.learner import Learner, State
from .peers import Peer, PeerTable

JITTER = 0.2


class Busy(Exception):
    """This node cannot take part in an exchange now (in another one, or stopping): HTTP 409."""


@dataclass
class ExchangeStats:
    ok: int = 0  # exchanges this node started that completed
    failed: int = 0  # started exchanges that failed (peer down, error reply, invalid reply)
    busy: int = 0  # started exchanges the peer declined with 409
    served: int = 0  # exchanges started by peers that this node completed
    rejected: int = 0  # incoming messages refused as invalid (4xx)
    bytes_sent: int = 0
    bytes_received: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=100), repr=False)

    def as_dict(self) -> dict:
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        return {
            "ok": self.ok,
            "failed": self.failed,
            "busy": self.busy,
            "served": self.served,
            "rejected": self.rejected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "mean_duration_s": mean,
        }


class Gossiper:
    def __init__(
        self,
        *,
        node_id: str,
        task: str,
        learner: Learner,
        peers: PeerTable,
        interval: float,
        rule: str = "average",
        cluster: str = "default",
        rng: random.Random,
        log: logging.LoggerAdapter,
        request_timeout: float = 10.0,
        port: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.task = task
        self.learner = learner
        self.rule_name = rule
        self.cluster = cluster
        self.rule = merge.get_rule(rule)
        self.peers = peers
        self.interval = interval
        self.rng = rng
        self.log = log
        self.spec = wire.spec_of(learner.snapshot().params)
        self.max_body = wire.max_message_size(self.spec)
        self.model_digest = wire.spec_digest(self.spec)
        self.stats = ExchangeStats()
        # called with (result, seconds) after every exchange this node starts (metrics)
        self.on_exchange: Callable[[str, float], None] | None = None
        # called with (sender id, url) when a peer this node does not know starts an exchange with it
        self.on_inbound: Callable[[str, str], None] | None = None
        self.port = port
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._busy = False
        self._closed = False

    @property
    def busy(self) -> bool:
        return self._busy

    def close(self) -> None:
        """Refuse exchanges from now on (the node is stopping)."""
        self._closed = True

    def encode_state(self, state: State) -> bytes:
        msg = wire.GossipMessage(
            self.node_id,
            state.age,
            state.params,
            self.task,
            self.rule_name,
            self.learner.train_size,
            state.weight,
            self.cluster,
            self.port,
        )
        return wire.encode(msg)

    def _decode(self, body: bytes) -> wire.GossipMessage:
        """Decode and check that the message can be merged with this node's rule."""
        msg = wire.decode(body, self.spec, self.task)
        if msg.cluster is not None and msg.cluster != self.cluster:
            raise wire.WireError(f"cluster {msg.cluster!r} does not match this node's {self.cluster!r}")
        if msg.merge is not None and msg.merge != self.rule_name:
            raise wire.WireError(f"merge rule {msg.merge!r} does not match this node's {self.rule_name!r}")
        needed = {"samples": "samples", "pushsum": "weight"}.get(self.rule_name)
        if needed and getattr(msg, needed) is None:
            raise wire.WireError(f"merge rule {self.rule_name!r} needs field {needed!r}")
        return msg

    def _local(self, state: State) -> merge.Side:
        return merge.Side(state.params, state.age, self.learner.train_size, state.weight)

    @staticmethod
    def _remote(msg: wire.GossipMessage) -> merge.Side:
        return merge.Side(msg.params, msg.age, msg.samples or 0, msg.weight or 1.0)

    # -- responder --------------------------------------------------------------------------------
    async def respond(self, body: bytes, remote: str | None = None) -> bytes:
        """Handle an incoming exchange from address ``remote``. Raises Busy or wire.WireError; the model is
        untouched then."""
        if self._closed:
            raise Busy("node is stopping")
        if self._busy:
            raise Busy("busy: already in an exchange")
        try:
            msg = self._decode(body)
        except wire.WireError:
            self.stats.rejected += 1
            raise
        self._busy = True
        try:

            def merge_in(state: State) -> tuple[dict, int, float]:
                m = self.rule(self._local(state), self._remote(msg))
                return m.params, m.age, m.weight

            before = await asyncio.to_thread(self.learner.update, merge_in)
            reply = self.encode_state(before)
            self.stats.served += 1
            self.stats.bytes_received += len(body)
            self.stats.bytes_sent += len(reply)
            self.log.debug("served exchange from %s", msg.sender)
            if remote and msg.port and self.on_inbound is not None:
                host = f"[{remote}]" if ":" in remote else remote
                url, known = f"http://{host}:{msg.port}", self.peers.get(msg.sender)
                if known is None or known.url != url:  # a new peer, or one that came back at a new address
                    self.on_inbound(msg.sender, url)
            return reply
        finally:
            self._busy = False

    # -- initiator --------------------------------------------------------------------------------
    async def run(self, session: aiohttp.ClientSession, stopping: asyncio.Event) -> None:
        """Every interval (+-20% jitter) start one exchange with a random live peer, until ``stopping``."""
        while not stopping.is_set():
            delay = self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
            try:
                await asyncio.wait_for(stopping.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
            peer = self.peers.choose(self.rng)
            if peer is not None and not self._busy:
                await self.exchange(session, peer)

    async def exchange(self, session: aiohttp.ClientSession, peer: Peer) -> str:
        """One push-pull exchange with ``peer``; returns "ok", "busy" or "failed"."""
        start = time.perf_counter()
        result = await self._exchange(session, peer, start)
        if self.on_exchange is not None:
            self.on_exchange(result, time.perf_counter() - start)
        return result

    async def _exchange(self, session: aiohttp.ClientSession, peer: Peer, start: float) -> str:
        self._busy = True
        try:
            sent = await asyncio.to_thread(self.learner.snapshot)
            body = self.encode_state(sent)
            async with session.post(
                peer.url + "/v1/gossip",
                data=body,
                timeout=self.timeout,
                headers={"Content-Type": wire.CONTENT_TYPE},
            ) as resp:
                self.stats.bytes_sent += len(body)
                if resp.status == 409:
                    self.stats.busy += 1
                    return "busy"
                if resp.status != 200:
                    detail = (await resp.text())[:200]
                    raise ExchangeError(f"HTTP {resp.status}: {detail}")
                raw = await read_limited(resp.content, resp.content_length, self.max_body)
                self.stats.bytes_received += len(raw)
            reply = self._decode(raw)

            def merge_back(state: State) -> tuple[dict, int, float]:
                m = self.rule(self._local(sent), self._remote(reply))
                params = m.params
                if state.version != sent.version:  # trained meanwhile: keep that progress
                    params = merge.rebase(state.params, sent.params, m.params)
                return params, max(state.age, m.age), m.weight

            await asyncio.to_thread(self.learner.update, merge_back)
        except (aiohttp.ClientError, TimeoutError, ExchangeError, TooLarge, wire.WireError) as e:
            self.stats.failed += 1
            self.peers.mark_failed(peer.id)
            self.log.info("exchange with %s failed: %s", peer.id, str(e) or type(e).__name__)
            return "failed"
        finally:
            self._busy = False
        duration = time.perf_counter() - start
        self.stats.ok += 1
        self.stats.durations.append(duration)
        self.peers.mark_ok(peer.id)
        self.log.debug("exchanged with %s in %.1f ms", peer.id, duration * 1e3)
        return "ok"


class ExchangeError(Exception):
    """The peer answered, but not with a usable reply."""

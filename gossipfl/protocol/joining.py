"""Joining late: a node that starts with no checkpoint while its peers have been training for a while
starts from the model of the most trained peer it can reach, before its first local step. Averaging an
untrained model into a trained network instead would pull every partner it meets first halfway back to
the start; the network would absorb it, but only after dragging its accuracy down.

The node asks up to ``CANDIDATES`` peers for their status (a member's signed read where there is a key
or TLS), takes the one whose model embodies the most training steps (``age``), reads its model
(``GET /v1/model``, the gossip message format) and adopts it: its parameters and age, but not its input
statistics (each node's own enter the network's average once, see ``_adopt``). If every peer it reached
is untrained too (a cluster starting together), it trains from its own initial model at once. See
SECURITY.md: the joiner trusts the member it pulls from."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from gossipfl.common.httpio import MAX_STATUS_BYTES, PEER_READ_TIMEOUT, BodyError, TooLarge
from gossipfl.protocol import wire
from gossipfl.protocol.core import GossipCore
from gossipfl.protocol.ports import PeerRef, Snapshot
from gossipfl.security.http import call, get_json
from gossipfl.security.signing import Unauthorized

CANDIDATES = 3  # peers asked for their age at each attempt
HOLDING = "joining: this node is fetching a trained model before it trains"  # why it answers 409 meanwhile
_FAILURES = (aiohttp.ClientError, TimeoutError, TooLarge, BodyError, ValueError, Unauthorized)


@dataclass(frozen=True)
class Joined:
    peer: str  # the peer whose model was adopted
    age: int  # its age


UNTRAINED = "untrained"  # every peer reached is untrained too: train from this node's own model


async def _age(core: GossipCore, session: aiohttp.ClientSession, peer: PeerRef) -> int | None:
    """The age the peer's status reports, or None when it cannot be read (or is not a count)."""
    try:
        status, _ = await get_json(
            session, core.membership, peer.url + "/v1/status", MAX_STATUS_BYTES, PEER_READ_TIMEOUT, expect=peer.id
        )
    except _FAILURES:
        return None
    age = status.get("age") if isinstance(status, dict) else None
    return age if isinstance(age, int) and not isinstance(age, bool) and 0 <= age <= wire.MAX_AGE else None


async def _model(core: GossipCore, session: aiohttp.ClientSession, peer: PeerRef) -> wire.GossipMessage | None:
    """The peer's working model, checked as a gossip message from it would be; None if it cannot be had."""
    timeout = aiohttp.ClientTimeout(total=core.request_timeout, sock_connect=PEER_READ_TIMEOUT.sock_connect)
    try:
        reply = await call(
            session, core.membership, "GET", peer.url + "/v1/model", limit=core.max_body, timeout=timeout,
            expect=peer.id,
        )  # fmt: skip
        if reply.status != 200:
            return None
        msg = wire.decode(reply.body, core.spec, core.task)
    except (*_FAILURES, wire.WireError):
        return None
    if msg.sender != peer.id or (msg.cluster is not None and msg.cluster != core.cluster):
        return None
    return msg


def _adopt(theirs: dict[str, np.ndarray], now: Snapshot, statistics: frozenset[str]) -> dict[str, np.ndarray]:
    """The peer's model, but this node's own input statistics (Standardize buffers, see learning/normalize.py):
    they describe its own data, and the gossip averages them exactly only if every node's enter it once."""
    return {k: (np.array(now.params[k]) if k in statistics else v) for k, v in theirs.items()}


async def join(
    core: GossipCore, session: aiohttp.ClientSession, peers: Sequence[PeerRef], rng: random.Random
) -> Joined | str | None:
    """One attempt: ``Joined`` when this node now holds the most trained reachable peer's model, ``UNTRAINED``
    when the peers reached have not trained yet, None when none could be read (try again later)."""
    asked = rng.sample(list(peers), min(CANDIDATES, len(peers)))
    ages = await asyncio.gather(*(_age(core, session, p) for p in asked))
    ranked = sorted(((a, p) for a, p in zip(ages, asked, strict=True) if a is not None), key=lambda x: -x[0])
    if not ranked:
        return None
    if ranked[0][0] == 0:
        return UNTRAINED
    for age, peer in ranked:
        if age == 0:
            break
        msg = await _model(core, session, peer)
        if msg is None:
            continue
        params = {k: np.array(v) for k, v in msg.params.items()}  # writable copies (decoded ones view the body)
        age, own = msg.age, core.learner.statistics
        if not await core.pause_merges():  # no merge may land on top of the adopted model, or under it
            return None
        try:
            adopt = lambda now, p=params, a=age, o=own: (_adopt(p, now, o), max(now.age, a), now.weight)  # noqa: E731
            await asyncio.to_thread(core.learner.update, adopt)
        finally:
            core.resume_merges()
        return Joined(peer.id, msg.age)
    return None


ALONE = "alone"  # no peer could be read within the wait: train from this node's own model
RETRY_S = 0.25  # while waiting, look for peers this often


async def join_when_ready(
    core: GossipCore,
    session: aiohttp.ClientSession,
    peers: Callable[[], Sequence[PeerRef]],
    rng: random.Random,
    wait: float,
    stopping: asyncio.Event,
) -> Joined | str:
    """Wait up to ``wait`` seconds for peers and ``join`` them; meanwhile the node neither starts nor accepts
    exchanges (``core.holding``), so that no trained peer averages with its untrained model. ``Joined``,
    ``UNTRAINED``, or ``ALONE`` when the wait ran out (or the node is stopping)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    core.holding = HOLDING
    try:
        while loop.time() < deadline and not stopping.is_set():
            found = peers()
            if found:
                outcome = await join(core, session, found, rng)
                if outcome is not None:
                    return outcome
            try:
                await asyncio.wait_for(stopping.wait(), min(RETRY_S, max(deadline - loop.time(), 0.0)))
            except TimeoutError:
                pass
        return ALONE
    finally:
        core.holding = None


def describe(outcome: Joined | str | None) -> dict[str, object]:
    """How a node started, for its status: ``state`` is waiting, joined, untrained (its peers were too),
    alone (none answered in time) or skipped (a checkpoint, no discovery, --join-wait 0, push-sum, or
    --no-train)."""
    if isinstance(outcome, Joined):
        return {"state": "joined", "peer": outcome.peer, "age": outcome.age}
    return {"state": "waiting" if outcome is None else outcome, "peer": None, "age": None}

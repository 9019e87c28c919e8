"""The initiator's side of an exchange: choose a peer, send this node's state (prepare), merge the reply,
ask the peer to commit, and apply the merge only if it did. A commit that goes unanswered leaves the
exchange in doubt: the initiator asks again later and applies the merge if the peer had committed it."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from gossipfl.common.httpio import BodyError, TooLarge
from gossipfl.protocol import merge, wire
from gossipfl.protocol.core import GossipCore
from gossipfl.protocol.ledger import COMMITTED, InDoubt
from gossipfl.protocol.ports import PeerRef, Snapshot
from gossipfl.protocol.transport import (
    BASE_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    ExchangeError,
    PeerBusy,
    post_decision,
    post_prepare,
)

JITTER = 0.2
MAX_OUTBOUND = 2  # exchanges this node has started and not finished
LINK_SHARE = 0.25  # at most this share of a node's time in exchanges it started (see pace)
PACE_WINDOW = 20  # recent exchanges whose median duration sets the pace


def pace(interval: float, durations: Sequence[float], share: float = LINK_SHARE) -> float:
    """Mean seconds between the starts of a node's exchanges: the configured ``interval``, or, when its
    exchanges take longer (a large model, a slow link, a busy machine), long enough that they fill at most
    ``share`` of the time: the median of the last ``PACE_WINDOW`` durations over ``share``. On the built-in
    tasks an exchange takes milliseconds and the interval rules; a 100 MB model over 1 Gbit/s takes
    seconds per exchange, and the node slows down instead of filling the link (and its peers' links, which
    answer as many exchanges as they start)."""
    recent = list(durations)[-PACE_WINDOW:]
    if not recent:
        return interval
    return max(interval, statistics.median(recent) / share)


class Initiator(GossipCore):
    def __init__(self, *, interval: float, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = interval
        self.rng = rng
        self.timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=CONNECT_TIMEOUT_S)
        self.decide_timeout = aiohttp.ClientTimeout(total=BASE_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        # called with (result, seconds) after every exchange this node starts (metrics)
        self.on_exchange: Callable[[str, float], None] | None = None
        self._outbound: dict[asyncio.Task, str] = {}  # exchanges this node started -> peer id
        self._resolving: asyncio.Task | None = None  # asking a peer again about an exchange in doubt

    def pace(self) -> float:
        """The current mean gap between this node's exchanges (see ``pace``)."""
        return pace(self.interval, self.stats.durations)

    def next_delay(self) -> float:
        return self.pace() * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def round(self, session: aiohttp.ClientSession) -> None:
        """One gossip round: settle exchanges in doubt, then, unless a fresh doubt holds merges back, start
        an exchange with a random peer that is not backing off and not already in one with this node."""
        self.resolve_doubts(session)
        if self._closed or len(self._outbound) >= MAX_OUTBOUND or self.frozen():
            return
        busy = set(self._outbound.values()) | self.doubts.peers()
        peer = self.peers.choose(self.rng, exclude=busy)
        if peer is not None:
            task = asyncio.get_running_loop().create_task(self.exchange(session, peer))
            self._outbound[task] = peer.id
            task.add_done_callback(self._exchange_done)

    def _exchange_done(self, task: asyncio.Task) -> None:
        self._outbound.pop(task, None)
        self._report(task)

    def resolve_doubts(self, session: aiohttp.ClientSession) -> None:
        """Give up on exchanges in doubt for too long; ask again about the one due first (one at a time,
        in a slot of its own, so that doubts about dead peers never take the slots of new exchanges)."""
        now = self.clock()
        for gone in self.doubts.expire(now):
            self._gave_up(gone, f"no answer to its commit for {self.doubts.give_up_s:.0f} s")
        if self._resolving is not None and not self._resolving.done():
            return
        due = sorted(self.doubts.due(now), key=lambda e: e.next_try)
        if due:
            self._resolving = asyncio.get_running_loop().create_task(self._resolve(session, due[0]))
            self._resolving.add_done_callback(self._report)

    def _gave_up(self, entry: InDoubt[Snapshot, merge.Merged], why: str) -> None:
        self.log.warning("exchange %s with %s: %s; assuming it aborted", entry.xid, entry.peer_id, why)

    async def exchange(self, session: aiohttp.ClientSession, peer: PeerRef) -> str:
        """One exchange with ``peer``; returns "ok", "busy", "aborted", "failed" or "in_doubt"."""
        start = time.perf_counter()
        result = await self._exchange(session, peer)
        duration = time.perf_counter() - start
        if result == "ok":
            self.stats.ok += 1
            self.stats.durations.append(duration)
            self.peers.mark_ok(peer.id)
        elif result == "busy":
            self.stats.busy += 1
            self.peers.mark_busy(peer.id)
        elif result == "aborted":
            self.stats.aborted += 1
            self.peers.mark_ok(peer.id)  # it answered: an abort says nothing against it
        else:  # failed, or in doubt (the commit went unanswered): either way the peer did not answer well
            self.stats.failed += 1
            self.stats.in_doubt += result == "in_doubt"
            self.peers.mark_failed(peer.id)
        if self.on_exchange is not None:
            self.on_exchange(result, duration)
        return result

    async def _exchange(self, session: aiohttp.ClientSession, peer: PeerRef) -> str:
        xid = wire.new_xid()
        sent = await asyncio.to_thread(self.learner.snapshot)
        try:
            body = self.encode_state(sent, xid)
        except wire.WireError as e:  # our own model is not sendable (NaN after a bad step): keep it home
            self.log.warning("not gossiping: this node's model is invalid: %s", e)
            return "failed"
        try:
            raw = await post_prepare(
                session, peer.url, body, timeout=self.timeout, max_body=self.max_body, stats=self.stats
            )
            reply = self._decode(raw)
            if reply.xid != xid or reply.sender != peer.id:
                raise ExchangeError(f"reply for exchange {reply.xid} from {reply.sender!r}, expected {peer.id!r}")
        except PeerBusy as e:
            self.log.debug("exchange with %s: busy (%s)", peer.id, e)
            return "busy"
        except (aiohttp.ClientError, TimeoutError, ExchangeError, TooLarge, BodyError, wire.WireError) as e:
            self.log.info("exchange with %s failed: %s", peer.id, str(e) or type(e).__name__)
            self._abort_later(session, peer, xid)
            return "failed"
        merged = await asyncio.to_thread(self._merge, sent, reply)
        if self._merging or self.frozen() or self.learner.merges != sent.merges:
            self._abort_later(session, peer, xid)  # another merge got in first: this one would overlap it
            return "aborted"
        self._merging = True  # set before any await: no other merge starts until this one is settled
        try:
            try:
                outcome = await post_decision(session, peer.url, xid, "commit", timeout=self.decide_timeout)
            except ExchangeError as e:  # the commit may have been taken: only the peer knows
                now = self.clock()
                for gone in self.doubts.add(InDoubt(xid, peer.id, peer.url, sent, merged, now), now):
                    self._gave_up(gone, "too many exchanges in doubt")
                self.log.info("exchange %s with %s in doubt (%s): will ask again", xid, peer.id, e)
                return "in_doubt"
            if outcome != COMMITTED:
                return "aborted"
            await self._apply(sent, merged)
        finally:
            self._merging = False
        self.log.debug("exchanged with %s", peer.id)
        return "ok"

    def _abort_later(self, session: aiohttp.ClientSession, peer: PeerRef, xid: str) -> None:
        """Tell the peer, best effort, to drop a prepared exchange (it expires there anyway)."""

        async def abort() -> None:
            try:
                await post_decision(session, peer.url, xid, "abort", timeout=self.decide_timeout)
            except ExchangeError:
                pass

        if not self._closed:
            self._background_task(abort())

    async def _resolve(self, session: aiohttp.ClientSession, entry: InDoubt[Snapshot, merge.Merged]) -> None:
        """Ask again about an exchange in doubt; apply its merge if the peer committed it."""
        try:
            outcome = await post_decision(session, entry.url, entry.xid, "commit", timeout=self.decide_timeout)
        except ExchangeError:
            self.doubts.retry_later(entry.xid, self.clock())
            return
        if self.doubts.resolve(entry.xid) is None:
            return
        if outcome == COMMITTED:
            while self._merging:  # another merge is being made: apply this one right after it
                await asyncio.sleep(0.005)
            self._merging = True
            try:
                late = self.learner.merges != entry.sent.merges
                await self._apply(entry.sent, entry.merged)
            finally:
                self._merging = False
            self.stats.late += 1
            how = "on top of other merges made since" if late else "exactly"
            self.log.info("exchange %s with %s: committed (learned late), applied %s", entry.xid, entry.peer_id, how)
        else:
            self.stats.aborted += 1
            self.log.info("exchange %s with %s: aborted (learned late)", entry.xid, entry.peer_id)
        self.peers.mark_ok(entry.peer_id)

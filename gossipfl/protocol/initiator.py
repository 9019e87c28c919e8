"""The initiator's side of an exchange: choose a peer, send this node's state (prepare), merge the reply,
ask the peer to commit, and apply the merge only if it did. A commit that goes unanswered leaves the
exchange in doubt: the initiator asks again later and applies the merge if the peer had committed it."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from gossipfl.common import httpio
from gossipfl.common.httpio import BodyError, TooLarge
from gossipfl.protocol import merge, wire
from gossipfl.protocol.core import GossipCore, Sent
from gossipfl.protocol.ledger import COMMITTED, InDoubt
from gossipfl.protocol.ports import PeerRef
from gossipfl.protocol.transport import (
    BASE_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    ExchangeError,
    PeerBusy,
    post_decision,
    post_prepare,
)
from gossipfl.security.membership import SHUN_S
from gossipfl.security.signing import Unauthorized

JITTER = 0.2
MAX_OUTBOUND = 2  # exchanges this node has started and not finished
LINK_SHARE = 0.25  # at most this share of the time in exchanges this node starts, per link (see pace)
PACE_PEERS = 20  # the peers this node exchanged with most recently set the pace...
PACE_HORIZON_S = 60.0  # ...if that exchange ended less than this long ago (a peer that left stops counting)
MIN_WAKE_S = 0.02  # the gossip loop never wakes more often than this
DOUBT_POLL_S = 0.25  # while a doubt is being asked about, look again this often for the next one due


def pace(interval: float, latest: Iterable[float], share: float = LINK_SHARE) -> float:
    """Mean seconds between the starts of a node's exchanges: the configured ``interval``, or, when even its
    fastest recent link is slow (a large model, a slow own link, a busy machine), long enough that its
    exchanges fill at most ``share`` of the time: the shortest of ``latest`` (the last exchange's duration
    with each of the recently contacted peers) over ``share``. The shortest, so that one slow or distant
    peer does not slow a node's exchanges with the others (that peer waits instead, see ``cooldown``), and
    so that one fast exchange is enough to recover after a slow spell. On the built-in tasks an exchange
    takes milliseconds and the interval rules; a 100 MB model over 1 Gbit/s takes seconds with every peer,
    and the node slows down instead of filling its link and its peers' (which answer as many exchanges as
    they start)."""
    fastest = min(latest, default=None)
    return interval if fastest is None else max(interval, fastest / share)


def cooldown(duration: float, share: float = LINK_SHARE) -> float:
    """Seconds after an exchange that took ``duration`` ends before this node starts another with that
    peer: so that exchanges it starts keep at most ``share`` of that link's time."""
    return duration * (1.0 / share - 1.0)


class Initiator(GossipCore):
    def __init__(self, *, interval: float, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = interval
        self.rng = rng
        # a reply from which no byte comes for STALL_S (a peer that stopped mid-stream) is cut off before its
        # size-dependent deadline
        self.timeout = aiohttp.ClientTimeout(
            total=self.request_timeout, sock_connect=CONNECT_TIMEOUT_S, sock_read=httpio.STALL_S
        )
        self.decide_timeout = aiohttp.ClientTimeout(total=BASE_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        # called with (result, seconds) after every exchange this node starts (metrics)
        self.on_exchange: Callable[[str, float], None] | None = None
        self._outbound: dict[asyncio.Task, str] = {}  # exchanges this node started -> peer id
        # per peer, (duration, end) of the last exchange that moved both models (committed or aborted),
        # most recent last, at most PACE_PEERS; and when this node may start the next one with it
        self._links: dict[str, tuple[float, float]] = {}
        self._not_before: dict[str, float] = {}
        self._next_start: float | None = None  # when the next exchange may start (None: one interval from now)
        self._resolving: asyncio.Task | None = None  # asking a peer again about an exchange in doubt

    def pace(self) -> float:
        """The current mean gap between the exchanges this node starts (see ``pace``)."""
        recent = self.clock() - PACE_HORIZON_S
        return pace(self.interval, (d for d, end in self._links.values() if end >= recent))

    def next_delay(self) -> float:
        """Seconds until the gossip loop's next round: the next exchange's start, or sooner when an exchange
        in doubt is due to be asked about again (doubts do not wait for a slow pace)."""
        now = self.clock()
        if self._next_start is None:
            self._next_start = now + self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
        wake = self._next_start
        if self._resolving is not None and not self._resolving.done():
            wake = min(wake, now + DOUBT_POLL_S)
        elif (due := self.doubts.next_due()) is not None:
            wake = min(wake, due)
        return max(MIN_WAKE_S, wake - now)

    def round(self, session: aiohttp.ClientSession) -> None:
        """One gossip round: settle exchanges in doubt, then, if it is time for the next exchange and no
        fresh doubt holds merges back, start one with a random peer that is not backing off, not cooling
        down (``cooldown``) and not already in an exchange with this node."""
        self.resolve_doubts(session)
        now = self.clock()
        if self._next_start is not None and now < self._next_start:
            return  # woke up for a doubt only
        if owed := self.upload.wait():  # over the upload budget: start when it is paid
            self._next_start = now + owed
            return
        self._next_start = now + self.pace() * self.rng.uniform(1 - JITTER, 1 + JITTER)
        if self._closed or self.holding is not None or len(self._outbound) >= MAX_OUTBOUND or self.frozen():
            return
        for peer_id in [p for p, t in self._not_before.items() if t <= now]:
            del self._not_before[peer_id]
        busy = set(self._outbound.values()) | self.doubts.peers() | set(self._not_before)
        peer = self.peers.choose(self.rng, exclude=busy)
        if peer is None and self._not_before:  # every candidate is cooling down: start when the first may
            self._next_start = min(self._next_start, min(self._not_before.values()))
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

    def _gave_up(self, entry: InDoubt[Sent, merge.Merged], why: str) -> None:
        self.log.warning("exchange %s with %s: %s; assuming it aborted", entry.xid, entry.peer_id, why)

    async def exchange(self, session: aiohttp.ClientSession, peer: PeerRef) -> str:
        """One exchange with ``peer``; returns "ok", "busy", "aborted", "failed", "unauthorized" (the peer
        refused this node's credentials or could not prove its own: it is ignored for a while) or "in_doubt"."""
        start = time.perf_counter()
        trace: dict[str, Any] = {}  # what the exchange got to: bytes each way, the models' distance
        result = await self._exchange(session, peer, trace)
        duration = time.perf_counter() - start
        self.stats.record(peer.id, "initiated", result, duration, trace.get("sent", 0), trace.get("received", 0),
                          trace.get("distance"), trace.get("error"))  # fmt: skip
        if result in ("ok", "aborted"):  # both models crossed the link: it says how long that takes
            self._links.pop(peer.id, None)
            self._links[peer.id] = (duration, self.clock())
            while len(self._links) > PACE_PEERS:
                del self._links[next(iter(self._links))]
            self._not_before[peer.id] = self.clock() + cooldown(duration)
        if result == "ok":
            self.stats.ok += 1
            self.stats.durations.append(duration)
            self.peers.mark_ok(peer.id)
        elif result == "busy":
            self.stats.busy += 1
            self.peers.mark_busy(peer.id)
        elif result == "unauthorized":
            self.stats.unauthorized += 1
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

    async def _exchange(self, session: aiohttp.ClientSession, peer: PeerRef, trace: dict[str, Any]) -> str:
        xid = wire.new_xid()
        state = await asyncio.to_thread(self.learner.snapshot)
        try:
            sent = await asyncio.to_thread(self.outgoing, state, xid, self.codec)
        except wire.WireError as e:  # our own model is not sendable (NaN after a bad step): keep it home
            self.log.warning("not gossiping: this node's model is invalid: %s", e)
            return "failed"
        del state  # (the body holds what it needs; a lossy codec's message no longer needs the snapshot)
        trace["sent"] = len(sent.body)
        try:
            raw = await post_prepare(
                session,
                self.membership,
                peer.url,
                peer.id,
                sent.body,
                xid=xid,
                timeout=self.timeout,
                max_body=self.max_body,
                stats=self.stats,
                upload=self.upload,
            )
            trace["received"] = len(raw)
            reply = self._decode(raw, at=sent.index, reply=True)
            del raw
            if reply.xid != xid or reply.sender != peer.id:
                raise ExchangeError(f"reply for exchange {reply.xid} from {reply.sender!r}, expected {peer.id!r}")
        except PeerBusy as e:
            self.log.debug("exchange with %s: busy (%s)", peer.id, e)
            trace["error"] = str(e)
            return "busy"
        except Unauthorized as e:  # not a member, or not the member expected: nothing of its reply is used
            trace["error"] = f"authentication: {e}"
            if self.peers.ignore(peer.id, peer.url, f"authentication: {e}", for_s=SHUN_S):
                self.log.warning("ignoring peer %s at %s for %.0f s: authentication: %s", peer.id, peer.url, SHUN_S, e)
            return "unauthorized"
        except (aiohttp.ClientError, TimeoutError, ExchangeError, TooLarge, BodyError, wire.WireError) as e:
            self.log.info("exchange with %s failed: %s", peer.id, str(e) or type(e).__name__)
            trace["error"] = str(e) or type(e).__name__
            self._abort_later(session, peer, xid)
            return "failed"
        try:
            merged = await asyncio.to_thread(self._merge, sent, reply)
            trace["distance"] = merged.distance
        except wire.WireError as e:  # robust.TooFar: the peer's model is implausibly far from this one
            self.log.info("exchange with %s refused: %s", peer.id, e)
            trace["error"] = str(e)
            self._abort_later(session, peer, xid)
            return "aborted"
        if self._merging or self.frozen() or self.learner.merges != sent.merges:
            self._abort_later(session, peer, xid)  # another merge got in first: this one would overlap it
            return "aborted"
        self._merging = True  # set before any await: no other merge starts until this one is settled
        try:
            try:
                outcome = await post_decision(
                    session, self.membership, peer.url, peer.id, xid, "commit", timeout=self.decide_timeout
                )
            except (ExchangeError, Unauthorized) as e:  # the commit may have been taken: only the peer knows
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
                await post_decision(
                    session, self.membership, peer.url, peer.id, xid, "abort", timeout=self.decide_timeout
                )
            except (ExchangeError, Unauthorized):
                pass

        if not self._closed:
            self._background_task(abort())

    async def _resolve(self, session: aiohttp.ClientSession, entry: InDoubt[Sent, merge.Merged]) -> None:
        """Ask again about an exchange in doubt; apply its merge if the peer committed it."""
        try:
            outcome = await post_decision(
                session, self.membership, entry.url, entry.peer_id, entry.xid, "commit", timeout=self.decide_timeout
            )
        except (ExchangeError, Unauthorized):
            self.doubts.retry_later(entry.xid, self.clock())
            return
        if self.doubts.resolve(entry.xid) is None:
            return
        if outcome == COMMITTED:
            await self.pause_merges(patience=math.inf)  # another merge is being made: apply this one right after it
            try:
                late = self.learner.merges != entry.sent.merges
                await self._apply(entry.sent, entry.merged)
            finally:
                self.resume_merges()
            self.stats.late += 1
            how = "on top of other merges made since" if late else "exactly"
            self.log.info("exchange %s with %s: committed (learned late), applied %s", entry.xid, entry.peer_id, how)
        else:
            self.stats.aborted += 1
            self.log.info("exchange %s with %s: aborted (learned late)", entry.xid, entry.peer_id)
        self.peers.mark_ok(entry.peer_id)

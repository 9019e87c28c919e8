"""The gossip protocol: two-phase push-pull exchanges, merged with the node's rule (default: averaging).

Initiator: snapshot its state, POST it to a random peer's ``/v1/gossip`` with a fresh exchange id (xid),
receive the peer's state, compute the merge, then ``POST /v1/gossip/{xid}/commit`` and apply the merge
if and only if the peer answers "committed". Responder: on a valid message, snapshot its state, compute
the same merge (rules are symmetric, see merge.py), keep it under the xid and reply with its state; on
the commit, apply it, once. See exchange.py for why an exchange then happens on both sides or neither.

A merge is applied on top of whatever local training happened since the snapshot (``merge.apply``). A
node makes one merge at a time (``_merging``, a flag checked and set with no await in between, so no
decision ever waits behind another) and aborts an exchange if another merge changed its model since the
snapshot, so committed merges do not overlap: on either side, a merge combines the two states exactly
as sent, plus the local steps made meanwhile. The one exception is an exchange in doubt for longer than
``FREEZE_S``: for its first seconds the node merges nothing else (so that the usual case, an answer lost
and asked again, stays exact), then it goes on merging with others, and if it later learns that the
peer committed, it applies its half on top of those merges: sums are still conserved, and quantities
that were non-negative on both sides (a push-sum weight, a BatchNorm variance) are kept so.

Waiting on the network blocks nothing: while an exchange waits for a slow or hung peer the node
prepares and commits inbound exchanges, and starts its next one with another peer (at most
``MAX_OUTBOUND`` at once, one more for settling a doubt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from . import merge, wire
from .exchange import ABORTED, COMMITTED, DoubtBook, InDoubt, Ledger
from .httpio import BodyError, TooLarge, read_limited
from .learning.learner import Learner, State
from .peers import Peer, PeerTable

JITTER = 0.2
MAX_OUTBOUND = 2  # exchanges this node has started and not finished
FREEZE_S = 3.0  # after an exchange went in doubt, this node merges nothing else for this long
CONNECT_TIMEOUT_S = 2.0
BASE_TIMEOUT_S = 2.0  # a prepare of a small model: connect, send, the peer's snapshot, the reply
MIN_THROUGHPUT = 8e6  # bytes/s assumed of the slowest link, for the size-dependent part of timeouts
PREPARED_MEMORY = 256 << 20  # bytes of prepared exchanges (two states each) a responder may hold
ERROR_TEXT_LIMIT = 512


def timeout_for(nbytes: int) -> float:
    """Seconds allowed for one request or body carrying ``nbytes`` (both directions of an exchange)."""
    return BASE_TIMEOUT_S + 2 * nbytes / MIN_THROUGHPUT


class Busy(Exception):
    """This node cannot prepare an exchange now (too many prepared, or stopping): HTTP 409."""


class Conflict(Exception):
    """The exchange id was already decided: HTTP 409."""


class Unavailable(Exception):
    """This node's own model cannot be sent (not finite): HTTP 503, the node's fault, not the peer's."""


class ExchangeError(Exception):
    """The peer answered, but not with a usable reply."""


class PeerBusy(ExchangeError):
    """The peer answered 409."""


@dataclass
class ExchangeStats:
    ok: int = 0  # exchanges this node started that committed
    failed: int = 0  # started exchanges that failed (peer down or hung, error reply, invalid reply)
    busy: int = 0  # started exchanges the peer declined with 409
    aborted: int = 0  # started exchanges aborted (overlapping merges, or the peer's decision)
    in_doubt: int = 0  # started exchanges whose commit went unanswered (counted in failed too)
    late: int = 0  # of those, committed by the peer and merged when this node learned it
    served: int = 0  # exchanges started by peers that this node committed
    declined: int = 0  # prepared exchanges this node aborted (expired, overlapping, unknown)
    rejected: int = 0  # incoming messages refused as invalid (4xx)
    bytes_sent: int = 0
    bytes_received: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=100), repr=False)

    def as_dict(self) -> dict:
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        out = {k: v for k, v in self.__dict__.items() if k != "durations"}
        out["mean_duration_s"] = mean
        return out


async def error_text(resp: aiohttp.ClientResponse) -> str:
    """A short, printable account of an error reply, whatever its bytes (never raises on bad encoding)."""
    try:
        raw = await asyncio.wait_for(resp.content.read(ERROR_TEXT_LIMIT), BASE_TIMEOUT_S)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except ValueError:
        pass
    return "".join(c if c.isprintable() else "?" for c in text[:200])


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
        port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self.clock = clock
        self.spec = wire.spec_of(learner.snapshot().params)
        self.max_body = wire.max_message_size(self.spec)
        self.model_digest = wire.spec_digest(self.spec)
        self.request_timeout = timeout_for(self.max_body)
        self.timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=CONNECT_TIMEOUT_S)
        self.decide_timeout = aiohttp.ClientTimeout(total=BASE_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        max_prepared = max(1, min(4, PREPARED_MEMORY // (2 * self.max_body)))
        self.ledger: Ledger[State, merge.Merged] = Ledger(
            max_prepared=max_prepared, prepare_ttl=self.request_timeout + BASE_TIMEOUT_S
        )
        self.doubts: DoubtBook[State, merge.Merged] = DoubtBook()
        self.stats = ExchangeStats()
        # called with (result, seconds) after every exchange this node starts (metrics)
        self.on_exchange: Callable[[str, float], None] | None = None
        # called with (sender id, url) when a peer this node does not know prepares an exchange with it
        self.on_inbound: Callable[[str, str], None] | None = None
        # called with an exception that escaped an exchange task (a bug: the supervisor counts it)
        self.on_error: Callable[[BaseException], None] | None = None
        self.port = port
        self._merging = False  # a merge is being decided or applied (either side); see the module docstring
        self.freeze_s = FREEZE_S
        self._receiving = 0  # gossip bodies being read (they count against the prepared exchanges)
        self._outbound: dict[asyncio.Task, str] = {}  # exchanges this node started -> peer id
        self._resolving: asyncio.Task | None = None  # asking a peer again about an exchange in doubt
        self._background: set[asyncio.Task] = set()  # best-effort aborts; merges committed as responder
        self._closed = False

    # -- shared -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new exchanges from now on (the node is stopping); decisions on prepared ones still run."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tasks(self) -> list[asyncio.Task]:
        """Everything exchange-related this node is doing (the node waits for these when it stops)."""
        extra = [self._resolving] if self._resolving is not None and not self._resolving.done() else []
        return [*self._outbound, *extra, *self._background]

    def frozen(self) -> bool:
        """An exchange went in doubt less than FREEZE_S ago: merge nothing else yet."""
        return self.doubts.fresh(self.clock(), self.freeze_s)

    def encode_state(self, state: State, xid: str | None = None) -> bytes:
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
            xid,
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
        if msg.xid is None:
            raise wire.WireError("field 'xid' is required in an exchange")
        return msg

    def _merge(self, mine: State, theirs: wire.GossipMessage) -> merge.Merged:
        local = merge.Side(mine.params, mine.age, self.learner.train_size, mine.weight)
        remote = merge.Side(theirs.params, theirs.age, theirs.samples or 0, theirs.weight or 1.0)
        return self.rule(local, remote)

    def _snapshot_and_merge(self, theirs: wire.GossipMessage) -> tuple[State, merge.Merged]:
        state = self.learner.snapshot()
        return state, self._merge(state, theirs)

    async def _apply(self, sent: State, merged: merge.Merged) -> None:
        """Set the learner to ``merged``, keeping what changed since ``sent`` (local steps; and other merges,
        for a merge applied late). The caller holds ``_merging``."""

        def fn(now: State) -> tuple[dict, int, float]:
            params = merge.apply(now.params, sent.params, merged.params, changed=now.version != sent.version)
            weight = merge.apply_weight(now.weight, sent.weight, merged.weight)
            if now.merges != sent.merges:  # applied late, on top of other merges
                params = merge.keep_nonnegative(params, now.params, sent.params, merged.params)
                weight = merge.keep_positive_weight(weight, now.weight, merged.weight)
            return params, max(now.age, merged.age), weight

        await asyncio.to_thread(self.learner.update, fn)

    # -- responder ----------------------------------------------------------------------------------
    def reserve(self) -> bool:
        """Claim room for one incoming exchange before its body is read; False (answer 409) if there is
        none or the node is stopping. Call ``release`` once the body was handled."""
        self.expire()
        if self._closed or not self.ledger.room(self._receiving):
            return False
        self._receiving += 1
        return True

    def expire(self) -> None:
        """Abort prepared exchanges whose decision did not come in time."""
        for entry in self.ledger.expire(self.clock()):
            self.stats.declined += 1
            self.log.debug("exchange %s from %s expired undecided", entry.xid, entry.sender)

    def release(self) -> None:
        self._receiving -= 1

    async def prepare(self, body: bytes, remote: str | None = None) -> bytes:
        """Phase 1 of an exchange started by a peer (from address ``remote``): reply with this node's state,
        keep the merge for the decision. Raises wire.WireError (400), Conflict or Busy (409), Unavailable
        (503); the model is never changed here."""
        try:
            msg = self._decode(body)
        except wire.WireError:
            self.stats.rejected += 1
            raise
        xid = msg.xid
        assert xid is not None
        if (outcome := self.ledger.outcome(xid)) is not None:
            raise Conflict(f"exchange {xid} was already {outcome}")
        if (entry := self.ledger.prepared(xid)) is not None:  # a retried prepare: the same reply again
            if entry.sender != msg.sender:
                raise Conflict(f"exchange {xid} belongs to another sender")
            return self.encode_state(entry.sent, xid)
        if self._closed:
            raise Busy("node is stopping")
        state, merged = await asyncio.to_thread(self._snapshot_and_merge, msg)
        try:
            reply = self.encode_state(state, xid)
        except wire.WireError as e:
            raise Unavailable(f"this node's model cannot be sent: {e}") from None
        if self.ledger.outcome(xid) is not None or self.ledger.prepared(xid) is not None:
            raise Conflict(f"exchange {xid} was decided while it was being prepared")
        self.ledger.prepare(xid, msg.sender, state, merged, self.clock())
        self.stats.bytes_received += len(body)
        self.stats.bytes_sent += len(reply)
        if remote and msg.port and self.on_inbound is not None:
            host = f"[{remote}]" if ":" in remote else remote
            url, known = f"http://{host}:{msg.port}", self.peers.get(msg.sender)
            if known is None or known.url != url:  # a new peer, or one that came back at a new address
                self.on_inbound(msg.sender, url)
        return reply

    async def decide(self, xid: str, decision: str) -> tuple[str, str]:
        """Phase 2: the initiator asks to commit or abort ``xid``. Returns (outcome, reason); the same
        outcome to every later call about the same xid. Decided without waiting for anything; a commit is
        answered once recorded, and applied right after (the node merges nothing else meanwhile)."""
        now = self.clock()
        self.expire()
        if (outcome := self.ledger.outcome(xid)) is not None:
            return outcome, "already decided"
        entry = self.ledger.prepared(xid)
        if entry is None:
            self.ledger.decide(xid, ABORTED, now)  # a prepare still on its way is refused when it arrives
            return ABORTED, "unknown exchange (never prepared here, or expired)"
        if decision != "commit":
            self.ledger.decide(xid, ABORTED, now)
            self.stats.declined += 1
            return ABORTED, "aborted by the initiator"
        if self._merging or self.frozen() or self.learner.merges != entry.sent.merges:
            self.ledger.decide(xid, ABORTED, now)
            self.stats.declined += 1
            return ABORTED, "another merge changed this node's model since the exchange was prepared"
        self.ledger.decide(xid, COMMITTED, now)
        self.stats.served += 1
        self._merging = True  # set before any await: from here on, no other merge can start
        self._background_task(self._apply_committed(entry.sent, entry.merged, xid, entry.sender))
        return COMMITTED, ""

    async def _apply_committed(self, sent: State, merged: merge.Merged, xid: str, sender: str) -> None:
        try:
            await self._apply(sent, merged)
        finally:
            self._merging = False
        self.log.debug("committed exchange %s from %s", xid, sender)

    def _background_task(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        self._report(task)

    def _report(self, task: asyncio.Task) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None and self.on_error is not None:
            self.on_error(exc)

    # -- initiator ----------------------------------------------------------------------------------
    def next_delay(self) -> float:
        return self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)

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

    def _gave_up(self, entry: InDoubt[State, merge.Merged], why: str) -> None:
        self.log.warning("exchange %s with %s: %s; assuming it aborted", entry.xid, entry.peer_id, why)

    async def exchange(self, session: aiohttp.ClientSession, peer: Peer) -> str:
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

    async def _exchange(self, session: aiohttp.ClientSession, peer: Peer) -> str:
        xid = wire.new_xid()
        sent = await asyncio.to_thread(self.learner.snapshot)
        try:
            body = self.encode_state(sent, xid)
        except wire.WireError as e:  # our own model is not sendable (NaN after a bad step): keep it home
            self.log.warning("not gossiping: this node's model is invalid: %s", e)
            return "failed"
        try:
            raw = await self._post_prepare(session, peer, body)
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
                outcome = await self._post_decision(session, peer.url, xid, "commit")
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

    async def _post_prepare(self, session: aiohttp.ClientSession, peer: Peer, body: bytes) -> bytes:
        """POST the prepare; retried once, with the same xid, if the connection broke before the reply came
        whole (the peer answers a retried prepare with the same reply)."""
        for attempt in (0, 1):
            try:
                async with session.post(
                    peer.url + "/v1/gossip",
                    data=body,
                    timeout=self.timeout,
                    headers={"Content-Type": wire.CONTENT_TYPE},
                    allow_redirects=False,
                ) as resp:
                    self.stats.bytes_sent += len(body)
                    if resp.status == 409:
                        raise PeerBusy(await error_text(resp))
                    if resp.status != 200:
                        raise ExchangeError(f"HTTP {resp.status}: {await error_text(resp)}")
                    raw = await read_limited(resp.content, resp.content_length, self.max_body)
                    self.stats.bytes_received += len(raw)
                    return raw
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, BodyError):
                if attempt:  # once: a pooled connection the peer had closed, or a reply cut short
                    raise
        raise AssertionError("unreachable")

    async def _post_decision(self, session: aiohttp.ClientSession, url: str, xid: str, decision: str) -> str:
        """POST commit or abort; the responder's outcome. Raises ExchangeError, whatever went wrong, when
        there is no clear answer."""
        try:
            async with session.post(
                f"{url}/v1/gossip/{xid}/{decision}", timeout=self.decide_timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise ExchangeError(f"HTTP {resp.status}: {await error_text(resp)}")
                doc = json.loads(await read_limited(resp.content, resp.content_length, 4096))
        except ExchangeError:
            raise
        except (aiohttp.ClientError, TimeoutError, BodyError, TooLarge, ValueError, RecursionError) as e:
            raise ExchangeError(str(e) or type(e).__name__) from None
        outcome = doc.get("outcome") if isinstance(doc, dict) else None
        if outcome not in (COMMITTED, ABORTED) or (isinstance(doc, dict) and doc.get("xid") != xid):
            raise ExchangeError(f"no outcome for exchange {xid} in the answer to {decision}")
        return outcome

    def _abort_later(self, session: aiohttp.ClientSession, peer: Peer, xid: str) -> None:
        """Tell the peer, best effort, to drop a prepared exchange (it expires there anyway)."""

        async def abort() -> None:
            try:
                await self._post_decision(session, peer.url, xid, "abort")
            except ExchangeError:
                pass

        if not self._closed:
            self._background_task(abort())

    async def _resolve(self, session: aiohttp.ClientSession, entry: InDoubt[State, merge.Merged]) -> None:
        """Ask again about an exchange in doubt; apply its merge if the peer committed it."""
        try:
            outcome = await self._post_decision(session, entry.url, entry.xid, "commit")
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

"""The initiator's side of a secure group round (a member's is groupmember.py). Every gossip interval, a node
with ``--secure-group K`` that is in no round takes the merge flag and:

1. snapshots and encodes its model, invites K-1 random peers (``POST /v1/group``: round id, member ids) and
   gets each one's public key for this round;
2. sends every member all K keys (``POST /v1/group/{round}/mask``) and gets each one's masked model; makes its
   own the same way;
3. adds the K masked vectors modulo 2**64 (the masks cancel: the sum of the models, and nothing else), decides
   to commit, applies the mean, and sends the sum to every member (``POST /v1/group/{round}/commit``).

Under mutual TLS every key travels with its member's signature and certificate (``security/keybinding.py``):
the initiator checks the members' and relays them, each member checks every other's.

Anything short of K valid masked vectors (a peer busy, unreachable, slow, refusing, or answering what the round
did not ask for) aborts the round: the initiator tells every invited peer, again with backoff to those that gave
no clear answer, and no model changes. Once the initiator has decided to commit, a member that did not confirm
the commit is sent it again, with backoff, while it still waits for a decision: the last attempt starts
``3 * request_timeout`` before ``give_up_s`` has passed since the decision. A member's ``give_up_s`` runs from
its masked vector's reply, at most one request timeout (the mask request's) before the decision, and an attempt
arrives within one request timeout or not at all: so every attempt arrives before the member gives up.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gossipfl.common.httpio import BodyError, TooLarge
from gossipfl.protocol import groupwire, wire
from gossipfl.protocol.groupcore import GroupBase, mean_in_range
from gossipfl.protocol.initiator import JITTER
from gossipfl.protocol.ledger import COMMITTED
from gossipfl.protocol.merge import MAX_AGE_GAIN
from gossipfl.protocol.ports import PeerRef
from gossipfl.protocol.transport import CONNECT_TIMEOUT_S
from gossipfl.security import masking
from gossipfl.security.http import call, error_text
from gossipfl.security.keybinding import Unbound
from gossipfl.security.membership import SHUN_S
from gossipfl.security.signing import Unauthorized

RETRY_BASE_S = 0.25  # a commit not confirmed is sent again after this, doubling, up to RETRY_MAX_S
RETRY_MAX_S = 10.0
HELLO_S = 2.0  # a node that knows too few peers for a round says hello to one of them at most this often


class RoundFailed(Exception):
    """A round cannot go on; ``reason`` is what the counters call it; ``stage``: how far it went ("start":
    no peer heard of it; "invite": peers were invited; "mask": they were sent the keys, and may have sent
    their masked vectors)."""

    def __init__(self, reason: str, peer: PeerRef | None, detail: str, stage: str = "invite") -> None:
        super().__init__(detail)
        self.reason, self.peer, self.stage = reason, peer, stage


class GroupInitiator(GroupBase):
    def __init__(self, *, interval: float, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = interval
        self.rng = rng
        self.timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=CONNECT_TIMEOUT_S)
        self.on_round: Callable[[str, float], None] | None = None  # (outcome, seconds) of each round started here
        self._next_start: float | None = None
        self._running: asyncio.Task | None = None
        self._hello_at = -HELLO_S

    def next_delay(self) -> float:
        now = self.core.clock()
        if self._next_start is None:
            self._next_start = now + self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
        return max(0.02, self._next_start - now)

    def round(self, session: aiohttp.ClientSession) -> None:
        """The gossip loop's round: start a group round with K-1 random peers that are not backing off, unless
        this node is in a round already (its own or a peer's) or knows too few peers."""
        now = self.core.clock()
        if self._next_start is not None and now < self._next_start:
            return
        self._next_start = now + self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
        if self.closed or self.round_id is not None or (self._running is not None and not self._running.done()):
            return
        chosen: list[PeerRef] = []
        while len(chosen) < self.stats.size - 1:
            peer = self.core.peers.choose(self.rng, exclude={p.id for p in chosen})
            if peer is None:  # too few peers now: tell one where this node is (one seed learns of its joiners)
                if chosen and now >= self._hello_at + HELLO_S and self.core.port:
                    self._hello_at = now
                    self._in_background(self._hello(session, chosen[0]))
                return
            chosen.append(peer)
        self._running = asyncio.get_running_loop().create_task(self.run(session, chosen))
        self._running.add_done_callback(self.core._report)

    @property
    def tasks(self) -> list[asyncio.Task]:
        running = [self._running] if self._running is not None and not self._running.done() else []
        return [*running, *super().tasks]

    async def run(self, session: aiohttp.ClientSession, peers: list[PeerRef]) -> str:
        """One round with ``peers``; its outcome: "committed", "aborted", or "busy" (this node is in another
        round: nothing started)."""
        round_id = secrets.token_hex(masking.ROUND_BYTES)
        if not await self._acquire(round_id):
            return "busy"
        start, sent0, received0 = time.perf_counter(), self.stats.bytes_sent, self.stats.bytes_received
        outcome, reason = "aborted", "error"  # unless the round ends as it should (a bug, or cancelled at stop)
        try:
            await self._run(session, peers, round_id)
            outcome, reason = COMMITTED, ""
        except RoundFailed as e:
            reason = e.reason
            self._failed(session, peers, round_id, e)
        except asyncio.CancelledError:
            reason = "stopping"
            raise
        except Exception as e:  # a bug: the peers are told all the same
            self._failed(session, peers, round_id, RoundFailed("error", None, f"{type(e).__name__}: {e}", "mask"))
            raise
        finally:
            self._release(round_id)
            seconds = time.perf_counter() - start
            nbytes = self.stats.bytes_sent - sent0 + self.stats.bytes_received - received0
            self.stats.ended(outcome, reason, len(peers) + 1, seconds, nbytes)
            if self.on_round is not None:
                self.on_round(outcome, seconds)
        return outcome

    async def _run(self, session: aiohttp.ClientSession, peers: list[PeerRef], round_id: str) -> None:
        core = self.core
        sent = await asyncio.to_thread(core.learner.snapshot)
        try:
            encoded = await asyncio.to_thread(self._encode, sent)
        except masking.OutOfRange as e:
            self._out_of_range(e, "initiator")
            raise RoundFailed("out_of_range", None, "this node's model does not fit", "start") from None
        members = (core.node_id, *(p.id for p in peers))
        invite = groupwire.Invite(
            round_id, core.node_id, members, core.cluster, core.task, core.model_digest, self.n, core.port
        )
        body = groupwire.encode_invite(invite)
        joined = await self._each(session, peers, "", body, lambda raw: groupwire.decode_joined(raw, round_id))
        key = masking.new_key()
        keys = (masking.public_bytes(key), *(j.key for j in joined))
        proofs = None
        if self.binder is not None:  # each member's key must be its own, signed with its certificate's key
            for peer, j in zip(peers, joined, strict=True):
                try:
                    self.binder.verify(j.proof, round_id, members, peer.id, j.key)
                except Unbound as e:
                    raise RoundFailed("invalid", peer, f"{peer.id}: its key is not bound to it: {e}") from None
            proofs = (self.binder.sign(round_id, members, keys[0]), *(j.proof for j in joined))
        body = groupwire.encode_keys(groupwire.Keys(round_id, core.node_id, keys, proofs))  # type: ignore[arg-type]
        rid = bytes.fromhex(round_id)
        try:
            own = await asyncio.to_thread(masking.masked_vector, encoded, key, keys, rid, members, 0)
        except masking.BadKey as e:  # a member's key is not a valid point
            raise RoundFailed("invalid", peers[e.position - 1], f"{peers[e.position - 1].id}: {e}") from None
        del key, encoded
        decode = lambda raw: groupwire.decode_masked(raw, round_id, self.n)  # noqa: E731
        try:
            masked = await self._each(session, peers, f"/{round_id}/mask", body, decode)
        except RoundFailed as e:
            e.stage = "mask"
            raise
        total = masking.add([own, *(m.data for m in masked)])
        if not mean_in_range(total, len(members)):
            raise RoundFailed("invalid", None, "the masked vectors do not add up to a mean in range", "mask")
        ages = [sent.age, *(j.age for j in joined)]
        age = min(max(ages), min(ages) + MAX_AGE_GAIN)  # the oldest member's, capped as in a pairwise merge
        # decided: from here on the round commits, whatever a member answers
        commit = groupwire.encode_vector(groupwire.Vector(round_id, core.node_id, total, age))
        _, pending = await asyncio.gather(
            self._apply_mean(sent, total, len(members), age), self._deliver(session, peers, round_id, "commit", commit)
        )
        if pending:
            self._in_background(self._redeliver(session, pending, round_id, "commit", commit))
        for p in peers:
            core.peers.mark_ok(p.id)
        core.log.debug("group round %s committed with %s", round_id, ", ".join(members[1:]))

    async def _each(
        self, session: aiohttp.ClientSession, peers: list[PeerRef], path: str, body: bytes, decode: Callable
    ) -> list[Any]:
        """POST ``body`` to every peer at once; their decoded replies, in order. RoundFailed on the first
        peer that fails (the others' requests are cancelled)."""

        async def one(peer: PeerRef) -> Any:
            raw = await self._post(session, peer, path, body)
            try:
                msg = decode(raw)
            except wire.WireError as e:
                raise RoundFailed("invalid", peer, f"{peer.id}: {e}") from None
            if msg.sender != peer.id:
                raise RoundFailed("invalid", peer, f"{peer.id} answered as {msg.sender!r}")
            return msg

        tasks = [asyncio.ensure_future(one(p)) for p in peers]
        for t in tasks:  # every failure is seen (the first is raised), even one that comes after the cancel
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
        errors = [e for t in tasks if t.done() and not t.cancelled() and (e := t.exception()) is not None]
        if errors:
            raise errors[0]
        return [t.result() for t in tasks]

    async def _post(self, session: aiohttp.ClientSession, peer: PeerRef, path: str, body: bytes) -> bytes:
        url = f"{peer.url}/v1/group{path}"  # path: "" (the invite) or /ROUND/PHASE
        try:
            reply = await call(
                session, self.core.membership, "POST", url, body=body, limit=self.max_body, timeout=self.timeout,
                expect=peer.id, headers={"Content-Type": wire.CONTENT_TYPE},
            )  # fmt: skip
        except Unauthorized as e:
            raise RoundFailed("unauthorized", peer, f"{peer.id}: {e}") from None
        except TimeoutError:
            raise RoundFailed("timeout", peer, f"{peer.id}: no answer within {self.request_timeout:.1f} s") from None
        except (aiohttp.ClientError, TooLarge, BodyError) as e:
            raise RoundFailed("unreachable", peer, f"{peer.id}: {str(e) or type(e).__name__}") from None
        self.stats.bytes_sent += len(body)
        if reply.status == 409:
            raise RoundFailed("busy", peer, f"{peer.id}: {error_text(reply.body)}")
        if reply.status != 200:
            raise RoundFailed("refused", peer, f"{peer.id}: HTTP {reply.status}: {error_text(reply.body)}")
        self.stats.bytes_received += len(reply.body)
        return reply.body

    def _failed(self, session: aiohttp.ClientSession, peers: list[PeerRef], round_id: str, e: RoundFailed) -> None:
        """Tell every invited peer the round is off (best effort), and note what the failing peer did."""
        log, book = self.core.log, self.core.peers
        (log.debug if e.reason == "busy" else log.info)("group round %s aborted: %s", round_id, e)
        if e.peer is not None:
            if e.reason == "busy":
                book.mark_busy(e.peer.id)
            elif e.reason == "unauthorized":
                if book.ignore(e.peer.id, e.peer.url, f"authentication: {e}", for_s=SHUN_S):
                    log.warning("ignoring peer %s for %.0f s: authentication: %s", e.peer.id, SHUN_S, e)
            elif e.reason in ("timeout", "unreachable"):
                book.mark_failed(e.peer.id)
        if e.stage != "start" and not self.closed:
            self._in_background(self._abort(session, peers, round_id, again=e.stage == "mask"))

    async def _hello(self, session: aiohttp.ClientSession, peer: PeerRef) -> None:
        assert self.core.port is not None
        try:
            await self._post(session, peer, "/hello", groupwire.encode_hello(self.core.node_id, self.core.port))
        except RoundFailed as e:
            self.core.log.debug("hello to %s: %s", peer.id, e)

    async def _abort(self, session: aiohttp.ClientSession, peers: list[PeerRef], round_id: str, again: bool) -> None:
        """Tell every peer the round is off; with ``again`` (the keys went out), again, with backoff, those that
        gave no clear answer (a member that sent its masked vector holds its merge flag until it hears, or for
        give_up_s; one that did not gives up hold_s after the invite)."""
        pending = await self._deliver(session, peers, round_id, "abort", b"")
        if pending and again:
            await self._redeliver(session, pending, round_id, "abort", b"")

    async def _decision(
        self, session: aiohttp.ClientSession, peer: PeerRef, round_id: str, what: str, body: bytes
    ) -> str | None:
        """POST commit or abort to one peer: its outcome, or None when there was no clear answer."""
        try:
            raw = await self._post(session, peer, f"/{round_id}/{what}", body)
            doc = json.loads(raw)
        except (RoundFailed, ValueError, RecursionError):
            return None
        outcome = doc.get("outcome") if isinstance(doc, dict) and doc.get("round") == round_id else None
        return outcome if isinstance(outcome, str) else None

    async def _deliver(
        self, session: aiohttp.ClientSession, peers: list[PeerRef], round_id: str, what: str, body: bytes
    ) -> list[PeerRef]:
        """Send the decision (``what``: commit or abort) to each of ``peers`` once; those that gave no clear
        answer."""
        outcomes = await asyncio.gather(*(self._decision(session, p, round_id, what, body) for p in peers))
        for peer, outcome in zip(peers, outcomes, strict=True):
            if what == "commit" and outcome is not None and outcome != COMMITTED:  # it gave up first: the mean moved
                self.stats.undelivered += 1
                self.core.log.warning("group round %s: %s did not take the commit (%s)", round_id, peer.id, outcome)
        return [p for p, outcome in zip(peers, outcomes, strict=True) if outcome is None]

    async def _redeliver(
        self, session: aiohttp.ClientSession, pending: list[PeerRef], round_id: str, what: str, body: bytes
    ) -> None:
        """Send the decision again, with backoff, to the members that did not confirm it, while they wait for
        it: each attempt starts early enough to arrive before the member gives up (see the module's docstring)."""
        wait, deadline = RETRY_BASE_S, self.core.clock() + self.give_up_s - 3 * self.request_timeout
        while pending and not self.closed and self.core.clock() + wait < deadline:
            await asyncio.sleep(wait)
            wait = min(RETRY_MAX_S, wait * 2)
            pending = await self._deliver(session, pending, round_id, what, body)
        if what != "commit":
            return
        for peer in pending:
            self.stats.undelivered += 1
            self.core.log.warning("group round %s: the commit never reached %s", round_id, peer.id)

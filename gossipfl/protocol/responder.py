"""The responder's side of an exchange: room is claimed before a body is read, the prepare is answered
with this node's state while the merge waits under the exchange id, and the decision (commit or abort)
is made once, at once, and answered the same to every later call about that id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gossipfl.common.chunks import Chunks
from gossipfl.protocol import compress, merge, wire
from gossipfl.protocol.core import GossipCore, Sent
from gossipfl.protocol.ledger import ABORTED, COMMITTED, Ledger, Prepared
from gossipfl.protocol.transport import BASE_TIMEOUT_S

PREPARED_MEMORY = 256 << 20  # bytes of prepared exchanges (two states each) a responder may hold


class Busy(Exception):
    """This node cannot prepare an exchange now (too many prepared, or stopping): HTTP 409."""


class Conflict(Exception):
    """The exchange id was already decided: HTTP 409."""


class Impersonation(Exception):
    """The message names another sender than the member who authenticated the request: HTTP 401."""


class Unavailable(Exception):
    """This node's own model cannot be sent (not finite): HTTP 503, the node's fault, not the peer's."""


class Responder(GossipCore):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        max_prepared = max(1, min(4, PREPARED_MEMORY // (2 * self.max_body)))
        self.ledger: Ledger[Sent, merge.Merged] = Ledger(
            max_prepared=max_prepared, prepare_ttl=self.request_timeout + BASE_TIMEOUT_S
        )
        # called with (sender id, url) when a peer this node does not know prepares an exchange with it
        self.on_inbound: Callable[[str, str], None] | None = None
        self._receiving = 0  # gossip bodies being read (they count against the prepared exchanges)

    def reserve(self, retry_of: str | None = None) -> bool:
        """Claim room for one incoming exchange before its body is read; False (answer 409) if there is
        none, the node is stopping or holding (joining), or it has sent its upload budget's worth for now.
        ``retry_of``: the xid a retried prepare says it repeats (transport.RETRY_HEADER); while that exchange
        is prepared here, the retry is let in regardless (it only gets the same reply again, and ``prepare``
        refuses it unless its body is that exchange's). Call ``release`` once the body was handled."""
        self.expire()
        if self._closed or self.holding is not None:
            return False
        if retry_of is None or self.ledger.prepared(retry_of) is None:
            if not self.ledger.room(self._receiving) or self.upload.wait():
                return False
            if self.upload.rate is not None and self._receiving:  # one reply at a time under a budget
                return False
        self._receiving += 1
        return True

    def refusal(self) -> str:
        """Why ``reserve`` refused (the 409's message)."""
        if self._closed:
            return "stopping"
        if self.holding is not None:
            return self.holding
        if owed := self.upload.wait():
            return f"busy: over its upload budget (--max-upload-rate) for {owed:.1f} s more"
        return "busy: no room for another exchange now"

    def expire(self) -> None:
        """Abort prepared exchanges whose decision did not come in time."""
        for entry in self.ledger.expire(self.clock()):
            self.stats.declined += 1
            self._record(entry, "expired")
            self.log.debug("exchange %s from %s expired undecided", entry.xid, entry.sender)

    def release(self) -> None:
        self._receiving -= 1

    def _answer(self, msg: wire.GossipMessage, xid: str) -> Sent:
        """This node's side of an exchange a peer started: its snapshot, in the initiator's codec (or at its
        top-k indices). Raises WireError when this node's own model cannot be sent."""
        return self.outgoing(self.learner.snapshot(), xid, compress.for_wire(msg.compress), at=msg.index)

    async def prepare(
        self, body: bytes | bytearray, remote: str | None = None, member: str | None = None, retry_of: str | None = None
    ) -> Chunks:
        """Phase 1 of an exchange started by a peer (from address ``remote``; ``member``: the node id the
        request authenticated as, None on an open node; ``retry_of``: see ``reserve``): reply with this
        node's state, keep the merge for the decision. Raises wire.WireError (400), Impersonation (401),
        Conflict or Busy (409), Unavailable (503); the model is never changed here."""
        try:
            msg = self._decode(body)
        except wire.WireError as e:
            self.stats.rejected += 1
            self.stats.record(member or remote or "?", "answered", "rejected", None, received=len(body), error=str(e))
            raise
        if member is not None and msg.sender != member:
            self.stats.rejected += 1
            self.stats.record(member, "answered", "rejected", None, received=len(body), error="impersonation")
            raise Impersonation(f"message from {msg.sender!r} sent by member {member!r}")
        xid = msg.xid
        assert xid is not None
        if retry_of is not None and (xid != retry_of or self.ledger.prepared(xid) is None):
            raise Busy(f"a retry of exchange {retry_of} that is not prepared here (any more)")
        if (outcome := self.ledger.outcome(xid)) is not None:
            raise Conflict(f"exchange {xid} was already {outcome}")
        if (entry := self.ledger.prepared(xid)) is not None:  # a retried prepare: the same reply again
            if entry.sender != msg.sender:
                raise Conflict(f"exchange {xid} belongs to another sender")
            return entry.sent.body
        if self._closed:
            raise Busy("node is stopping")
        try:
            sent = await asyncio.to_thread(self._answer, msg, xid)
        except wire.WireError as e:
            raise Unavailable(f"this node's model cannot be sent: {e}") from None
        try:
            merged = await asyncio.to_thread(self._merge, sent, msg)
        except wire.WireError as e:  # robust.TooFar: implausibly far from this node's model
            self.stats.rejected += 1
            self.stats.record(msg.sender, "answered", "rejected", None, received=len(body), error=str(e))
            raise
        reply = sent.body
        if self.ledger.outcome(xid) is not None or self.ledger.prepared(xid) is not None:
            raise Conflict(f"exchange {xid} was decided while it was being prepared")
        self.ledger.prepare(xid, msg.sender, sent, merged, self.clock(), received=len(body))
        self.stats.bytes_received += len(body)
        self.stats.bytes_sent += len(reply)
        self.upload.spend(len(reply))
        if remote and msg.port and self.on_inbound is not None:
            host = f"[{remote}]" if ":" in remote else remote
            url, known = f"{self.membership.scheme}://{host}:{msg.port}", self.peers.get(msg.sender)
            if known is None or known.url != url:  # a new peer, or one that came back at a new address
                self.on_inbound(msg.sender, url)
        return reply

    async def decide(self, xid: str, decision: str, member: str | None = None) -> tuple[str, str]:
        """Phase 2: the initiator asks to commit or abort ``xid``. Returns (outcome, reason); the same
        outcome to every later call about the same xid. Decided without waiting for anything; a commit is
        answered once recorded, and applied right after (the node merges nothing else meanwhile). ``member``:
        who asks (authenticated; None on an open node): only the member that prepared an exchange decides it
        (Impersonation otherwise)."""
        now = self.clock()
        self.expire()
        if member is not None and (entry := self.ledger.prepared(xid)) is not None and entry.sender != member:
            raise Impersonation(f"exchange {xid} belongs to another member")
        if (outcome := self.ledger.outcome(xid)) is not None:
            return outcome, "already decided"
        entry = self.ledger.prepared(xid)
        if entry is None:
            self.ledger.decide(xid, ABORTED, now)  # a prepare still on its way is refused when it arrives
            return ABORTED, "unknown exchange (never prepared here, or expired)"
        if decision != "commit":
            self.ledger.decide(xid, ABORTED, now)
            self.stats.declined += 1
            self._record(entry, "aborted")
            return ABORTED, "aborted by the initiator"
        if self._merging or self.frozen() or self.learner.merges != entry.sent.merges:
            self.ledger.decide(xid, ABORTED, now)
            self.stats.declined += 1
            self._record(entry, "declined")
            return ABORTED, "another merge changed this node's model since the exchange was prepared"
        self.ledger.decide(xid, COMMITTED, now)
        self.stats.served += 1
        self._record(entry, "ok")
        self._merging = True  # set before any await: from here on, no other merge can start
        self._background_task(self._apply_committed(entry.sent, entry.merged, xid, entry.sender))
        return COMMITTED, ""

    def _record(self, entry: Prepared[Sent, merge.Merged], result: str) -> None:
        """An exchange a peer started, as decided (or expired: then at its expiry, noticed maybe later), for
        the dashboard."""
        end = min(self.clock(), entry.expires)
        duration = end - (entry.expires - self.ledger.prepare_ttl)  # since it was prepared
        at = time.time() - (self.clock() - end)
        sent = len(entry.sent.body)
        self.stats.record(
            entry.sender, "answered", result, duration, sent, entry.received, entry.merged.distance, at=at
        )

    async def _apply_committed(self, sent: Sent, merged: merge.Merged, xid: str, sender: str) -> None:
        try:
            await self._apply(sent, merged)
        finally:
            self._merging = False
        self.log.debug("committed exchange %s from %s", xid, sender)

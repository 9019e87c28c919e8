"""The gossip protocol: two-phase push-pull exchanges, merged with the node's rule (default: averaging).

Initiator: snapshot its state, POST it to a random peer's ``/v1/gossip`` with a fresh exchange id (xid),
receive the peer's state, compute the merge, then ``POST /v1/gossip/{xid}/commit`` and apply the merge
if and only if the peer answers "committed". Responder: on a valid message, snapshot its state, compute
the same merge (rules are symmetric, see merge.py), keep it under the xid and reply with its state; on
the commit, apply it, once. See ledger.py for why an exchange then happens on both sides or neither.

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

from gossipfl.protocol.core import FREEZE_S, GossipCore
from gossipfl.protocol.initiator import JITTER, MAX_OUTBOUND, Initiator
from gossipfl.protocol.responder import PREPARED_MEMORY, Busy, Conflict, Responder, Unavailable
from gossipfl.protocol.stats import ExchangeStats
from gossipfl.protocol.transport import ExchangeError, PeerBusy, timeout_for

__all__ = [
    "FREEZE_S",
    "JITTER",
    "MAX_OUTBOUND",
    "PREPARED_MEMORY",
    "Busy",
    "Conflict",
    "ExchangeError",
    "ExchangeStats",
    "GossipCore",
    "Gossiper",
    "PeerBusy",
    "Unavailable",
    "timeout_for",
]


class Gossiper(Initiator, Responder):
    """Both sides of the exchange for one node (keyword arguments: see GossipCore, Initiator)."""

    @property
    def tasks(self) -> list[asyncio.Task]:
        """Everything exchange-related this node is doing (the node waits for these when it stops)."""
        extra = [self._resolving] if self._resolving is not None and not self._resolving.done() else []
        return [*self._outbound, *extra, *self._background]

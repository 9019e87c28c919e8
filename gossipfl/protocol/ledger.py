"""Bookkeeping of two-phase exchanges, without I/O: what a responder has prepared and decided, and what
an initiator is in doubt about. Callers pass the clock (``now``), so every rule here is testable alone.

An exchange, identified by a random ``xid``:

1. *prepare*: the initiator sends its state; the responder snapshots its own, computes the merge, keeps
   both under the xid for ``prepare_ttl`` seconds, and replies with its state. Nothing is merged yet.
2. *decide*: the initiator, holding both states, asks the responder to commit (or to abort). The
   responder alone decides, once: it commits if the xid is still prepared and no other merge changed
   its model since the snapshot, and aborts otherwise (unknown, expired, overlapping). It records the
   outcome for ``remember_s`` seconds, so a retried decision gets the same answer and a late prepare
   of a decided xid is refused. The initiator merges if and only if it learns "committed".

So an exchange happens on both sides or on neither, whatever is lost or delayed: a prepare that times
out is never committed (the responder's entry expires, or a later abort removes it); a commit whose
answer is lost leaves the initiator *in doubt*, and it asks again (``InDoubt``) until it learns the
outcome. The cost of that guarantee: while in doubt, the initiator's half of the merge waits (and for
the first seconds of a doubt the node merges nothing else, see gossiper.py).

Outcomes of exchanges that were prepared here are kept for ``remember_s``, never evicted earlier
unless more than ``max_remembered`` were prepared in that time (each took a whole model to prepare).
Aborts of ids never prepared here (a commit or abort that overtook its prepare, or noise) are kept
apart, in a bounded set that anyone can flood without touching the outcomes that matter.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

COMMITTED = "committed"
ABORTED = "aborted"

S = TypeVar("S")  # the snapshot a side keeps (a learner State)
M = TypeVar("M")  # the merge computed from both snapshots


@dataclass
class Prepared(Generic[S, M]):
    """A responder's half of an exchange, waiting for the initiator's decision."""

    xid: str
    sender: str
    sent: S  # the responder's state, as sent in its reply
    merged: M
    expires: float
    received: int = 0  # bytes of the initiator's message


class Ledger(Generic[S, M]):
    """A responder's exchanges: prepared ones (at most ``max_prepared``) and recent outcomes."""

    def __init__(
        self, *, max_prepared: int, prepare_ttl: float, remember_s: float = 600.0, max_remembered: int = 65536
    ) -> None:
        self.max_prepared = max_prepared
        self.prepare_ttl = prepare_ttl
        self.remember_s = remember_s
        self.max_remembered = max_remembered
        self._prepared: dict[str, Prepared[S, M]] = {}
        self._decided: OrderedDict[str, tuple[str, float]] = OrderedDict()  # xid -> (outcome, when)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # never-prepared xids aborted -> when

    def __len__(self) -> int:
        return len(self._prepared)

    def outcome(self, xid: str) -> str | None:
        entry = self._decided.get(xid)
        if entry:
            return entry[0]
        return ABORTED if xid in self._unknown else None

    def prepared(self, xid: str) -> Prepared[S, M] | None:
        return self._prepared.get(xid)

    def room(self, reserved: int = 0) -> bool:
        """Whether one more exchange can be prepared, counting ``reserved`` ones still being received."""
        return len(self._prepared) + reserved < self.max_prepared

    def prepare(self, xid: str, sender: str, sent: S, merged: M, now: float, received: int = 0) -> Prepared[S, M]:
        if xid in self._prepared or self.outcome(xid) is not None:
            raise ValueError(f"exchange {xid} is already known")
        entry = Prepared(xid, sender, sent, merged, now + self.prepare_ttl, received)
        self._prepared[xid] = entry
        return entry

    def decide(self, xid: str, outcome: str, now: float) -> Prepared[S, M] | None:
        """Record ``outcome`` for ``xid`` (first decision wins) and release its prepared entry, if any. An
        xid never prepared here can only be aborted."""
        if outcome not in (COMMITTED, ABORTED):
            raise ValueError(f"unknown outcome {outcome!r}")
        if self.outcome(xid) is not None:
            return None
        entry = self._prepared.pop(xid, None)
        if entry is None:
            if outcome == COMMITTED:
                raise ValueError(f"exchange {xid} was never prepared: it cannot be committed")
            self._unknown[xid] = now
            while len(self._unknown) > self.max_remembered:
                self._unknown.popitem(last=False)
            return None
        self._decided[xid] = (outcome, now)
        while len(self._decided) > self.max_remembered:
            self._decided.popitem(last=False)
        return entry

    def committed(self, now: float) -> list[tuple[str, float]]:
        """(xid, seconds ago) of the exchanges committed here and still remembered, oldest first: what a
        checkpoint keeps, so that an initiator in doubt about one is told "committed" after a restart too
        (any other xid is answered "aborted", which is right for one undecided at a restart)."""
        return [(xid, round(now - when, 3)) for xid, (outcome, when) in self._decided.items() if outcome == COMMITTED]

    def restore_committed(self, entries: list[tuple[str, float]], now: float) -> None:
        """Take back what ``committed`` gave (ages counted to ``now``); ValueError, changing nothing, when an
        entry is not an (xid, non-negative seconds) pair."""
        parsed = []
        for entry in entries:
            xid, ago = entry
            if not isinstance(xid, str) or isinstance(ago, bool) or not isinstance(ago, (int, float)) or not ago >= 0:
                raise ValueError(f"committed exchange {entry!r}: expected [xid, seconds ago]")
            parsed.append((xid, now - float(ago)))
        for xid, when in parsed[-self.max_remembered :]:
            if when > now - self.remember_s:
                self._decided[xid] = (COMMITTED, when)

    def forget_outcomes(self) -> None:
        self._decided.clear()
        self._unknown.clear()

    def expire(self, now: float) -> list[Prepared[S, M]]:
        """Abort the prepared exchanges whose decision did not come in time; forget old outcomes."""
        gone = [p for p in self._prepared.values() if p.expires <= now]
        for p in gone:
            self.decide(p.xid, ABORTED, now)
        while self._decided and next(iter(self._decided.values()))[1] <= now - self.remember_s:
            self._decided.popitem(last=False)
        while self._unknown and next(iter(self._unknown.values())) <= now - self.remember_s:
            self._unknown.popitem(last=False)
        return gone


@dataclass
class InDoubt(Generic[S, M]):
    """An initiator's exchange whose commit was sent but whose outcome it did not hear."""

    xid: str
    peer_id: str
    url: str
    sent: S
    merged: M
    since: float
    tries: int = 0
    next_try: float = 0.0


class DoubtBook(Generic[S, M]):
    """An initiator's exchanges in doubt (at most ``max_entries``), retried with exponential backoff until
    an answer comes or ``give_up_s`` passes (well within the ``remember_s`` a responder keeps outcomes)."""

    def __init__(
        self, *, give_up_s: float = 120.0, retry_base: float = 0.1, retry_max: float = 30.0, max_entries: int = 4
    ) -> None:
        self.give_up_s = give_up_s
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_entries = max_entries
        self._entries: dict[str, InDoubt[S, M]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: InDoubt[S, M], now: float) -> list[InDoubt[S, M]]:
        """Keep ``entry``; return the oldest entries given up to make room (each holds two models)."""
        entry.next_try = now + self.retry_base
        self._entries[entry.xid] = entry
        dropped = []
        while len(self._entries) > self.max_entries:
            oldest = min(self._entries.values(), key=lambda e: e.since)
            dropped.append(self._entries.pop(oldest.xid))
        return dropped

    def fresh(self, now: float, within: float) -> bool:
        """Whether some exchange went in doubt less than ``within`` seconds ago."""
        return any(e.since > now - within for e in self._entries.values())

    def peers(self) -> set[str]:
        return {e.peer_id for e in self._entries.values()}

    def due(self, now: float) -> list[InDoubt[S, M]]:
        return [e for e in self._entries.values() if e.next_try <= now]

    def next_due(self) -> float | None:
        """When the first entry is due to be asked again (None when there is nothing in doubt)."""
        return min((e.next_try for e in self._entries.values()), default=None)

    def retry_later(self, xid: str, now: float) -> None:
        if entry := self._entries.get(xid):
            entry.tries += 1
            entry.next_try = now + min(self.retry_max, self.retry_base * 2**entry.tries)

    def resolve(self, xid: str) -> InDoubt[S, M] | None:
        return self._entries.pop(xid, None)

    def expire(self, now: float) -> list[InDoubt[S, M]]:
        gone = [e for e in self._entries.values() if e.since <= now - self.give_up_s]
        for e in gone:
            del self._entries[e.xid]
        return gone

"""The peer table: who this node knows, whether they answer, and picking a partner.

Liveness comes from our own exchanges, not from mDNS: a node killed without goodbye stays in mDNS
caches for many minutes, so a peer that fails (refuses, times out, answers badly), whatever its
source, is retried with exponential backoff instead; a peer that keeps answering 409 (busy) is backed
off too, without counting as failing. Peers learned from DNS, peer exchange or an inbound call are
forgotten after a run of failures; seeds and mDNS peers stay, backing off, until mDNS says goodbye.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

LEARNED = ("dns", "pex", "inbound", "checkpoint")  # sources that are forgotten when the peer stops answering
MAX_IGNORED = 256


@dataclass
class Peer:
    id: str
    url: str
    task: str | None
    # how we learned it: "mdns", "static", "dns", "pex" (a partner's peer list) or "inbound" (it called us)
    source: str
    last_ok: float | None = None  # clock time of the last successful exchange
    failures: int = 0  # consecutive failures
    busy: int = 0  # consecutive 409 answers
    retry_at: float = 0.0  # not chosen before this clock time

    @property
    def alive(self) -> bool:
        return self.failures == 0


class PeerTable:
    def __init__(
        self,
        self_id: str,
        *,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_id = self_id
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self._peers: dict[str, Peer] = {}
        self._ignored: dict[str, dict[str, str]] = {}  # seen but not gossiped with, and why
        # addresses that failed authentication: (not re-added before this clock time, the peer that was
        # there, to retry then). By address, not by id: anyone can announce any id over mDNS, and a rogue
        # claiming an honest node's id must not get that node shunned.
        self._shunned: dict[str, tuple[float, Peer | None]] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: str) -> Peer | None:
        return self._peers.get(peer_id)

    def upsert(self, peer_id: str, url: str, task: str | None, source: str) -> bool:
        """Add or refresh a peer; return True when it is new (or its address changed). Ignores self."""
        if peer_id == self.self_id or self.shunned(url):
            return False
        self._ignored.pop(peer_id, None)
        old = self._peers.get(peer_id)
        if old is not None and old.url == url:
            old.task = task or old.task
            return False
        if old is not None and source in LEARNED and old.source not in LEARNED:
            # a seed or an mDNS peer seen at another address: move it only if its own address is not
            # known to work, and keep its source (it stays a peer that is never forgotten)
            if old.last_ok is not None and old.failures == 0:
                return False
            source = old.source
        self._peers[peer_id] = Peer(peer_id, url, task, source)
        return True

    def ignore(self, peer_id: str, url: str | None, reason: str, for_s: float | None = None) -> bool:
        """Record a node that cannot be gossiped with (other task, protocol or model shape); True if new.
        With ``for_s``, a failed authentication at ``url``: that address is shunned for ``for_s`` seconds
        (discovery cannot add it back meanwhile), and the peer is dropped only if that is its address."""
        if peer_id == self.self_id:
            return False
        if for_s is not None and url:
            known = self._peers.get(peer_id)
            peer = self._peers.pop(peer_id) if known is not None and known.url == url else None
            self._shunned[url] = (self.clock() + for_s, peer)
            while len(self._shunned) > MAX_IGNORED:
                del self._shunned[next(iter(self._shunned))]
        else:
            self._peers.pop(peer_id, None)
        if len(self._ignored) >= MAX_IGNORED and peer_id not in self._ignored:
            self._ignored.pop(next(iter(self._ignored)))  # the oldest entry
        new = self._ignored.get(peer_id, {}).get("reason") != reason
        self._ignored[peer_id] = {"id": peer_id, "url": url or "", "reason": reason}
        return new

    def shunned(self, url: str) -> bool:
        """Whether the node at ``url`` failed authentication recently (see ``ignore``)."""
        entry = self._shunned.get(url)
        if entry is not None and entry[0] <= self.clock():
            del self._shunned[url]
            self._readmit_one(entry[1])
            return False
        return entry is not None

    def _readmit_one(self, peer: Peer | None) -> None:
        if peer is not None and peer.id not in self._peers:
            self._ignored.pop(peer.id, None)
            peer.failures = peer.busy = 0
            peer.retry_at = 0.0
            self._peers[peer.id] = peer

    def _readmit(self) -> None:
        """Peers whose time out for a failed authentication is over are tried again (keys get rotated, a
        misconfigured node gets fixed), as the peers they were; a new failure sends them out again."""
        for url in list(self._shunned):
            self.shunned(url)  # expires the entry, and readmits its peer, when its time is over

    def ignored(self) -> list[dict[str, str]]:
        return [self._ignored[k] for k in sorted(self._ignored)]

    def all(self) -> list[Peer]:
        return list(self._peers.values())

    def expire(self, sources: tuple[str, ...], max_failures: int) -> list[str]:
        """Forget peers learned from ``sources`` that failed ``max_failures`` times in a row; their ids."""
        gone = [p.id for p in self._peers.values() if p.source in sources and p.failures >= max_failures]
        for peer_id in gone:
            del self._peers[peer_id]
        return gone

    def remove(self, peer_id: str) -> bool:
        self._ignored.pop(peer_id, None)
        return self._peers.pop(peer_id, None) is not None

    def mark_ok(self, peer_id: str) -> None:
        if peer := self._peers.get(peer_id):
            peer.last_ok = self.clock()
            peer.failures = peer.busy = 0
            peer.retry_at = 0.0

    def mark_failed(self, peer_id: str) -> None:
        if peer := self._peers.get(peer_id):
            peer.failures += 1
            peer.retry_at = self.clock() + self._backoff(peer.failures)

    def mark_busy(self, peer_id: str) -> None:
        """The peer answered 409: back off from the second one in a row, but it is not failing."""
        if peer := self._peers.get(peer_id):
            peer.busy += 1
            if peer.busy > 1:
                peer.retry_at = max(peer.retry_at, self.clock() + self._backoff(peer.busy - 1))

    def refresh(self, peer_id: str) -> None:
        """The peer announced itself again (it restarted or came back): try it at once."""
        if peer := self._peers.get(peer_id):
            peer.retry_at = 0.0

    def _backoff(self, n: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** min(n - 1, 30))

    def candidates(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Peer]:
        if self._shunned:
            self._readmit()
        now = self.clock()
        return [p for p in self._peers.values() if p.retry_at <= now and p.id not in exclude]

    def choose(self, rng: random.Random, exclude: set[str] | frozenset[str] = frozenset()) -> Peer | None:
        """A uniformly random peer among those not backing off and not in ``exclude``."""
        pool = self.candidates(exclude)
        return rng.choice(pool) if pool else None

    def working(self) -> list[Peer]:
        """Peers not currently failing: what this node tells others it knows (peer exchange)."""
        return [p for p in self._peers.values() if p.failures == 0]

    def describe(self, peers: list[Peer] | None = None) -> list[dict]:
        now = self.clock()
        rows = []
        for p in sorted(self._peers.values() if peers is None else peers, key=lambda p: p.id):
            row = asdict(p)
            row["alive"] = p.alive
            row["last_ok_s_ago"] = None if p.last_ok is None else round(now - p.last_ok, 3)
            row["retry_in_s"] = round(max(0.0, p.retry_at - now), 3)
            del row["last_ok"], row["retry_at"]
            rows.append(row)
        return rows

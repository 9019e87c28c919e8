"""Peer exchange: now and then a node reads a random partner's ``GET /v1/peers`` and probes the peers it
did not know, so one static seed is enough to reach a whole network that multicast does not span.
Peers learned this way (or from DNS) that keep failing are forgotten."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from gossipfl.common.httpio import PEER_READ_TIMEOUT, TooLarge
from gossipfl.discovery.peers import LEARNED, PeerTable
from gossipfl.discovery.probing import Prober
from gossipfl.security.http import get_json
from gossipfl.security.signing import Unauthorized

SOURCE = "pex"
MAX_LIST_BYTES = 1 << 20
FORGET_AFTER_FAILURES = 5  # with backoff 1, 2, 4, 8, 16 s: about half a minute of silence
MAX_PEERS = 256  # peer exchange stops adding peers beyond this many
FORGETTABLE = LEARNED  # not peers named by a person (static) or announced over mDNS


class PeerExchange:
    def __init__(
        self,
        *,
        prober: Prober,
        peers: PeerTable,
        session_factory: Callable[[], aiohttp.ClientSession],
        rng: random.Random,
        log: logging.LoggerAdapter,
        max_new: int = 8,
    ) -> None:
        self.prober = prober
        self.peers = peers
        self.session_factory = session_factory
        self.rng = rng
        self.log = log
        self.max_new = max_new

    async def round(self) -> None:
        """Forget peers that keep failing; read a random partner's list and probe the peers it names."""
        for peer_id in self.peers.expire(FORGETTABLE, FORGET_AFTER_FAILURES):
            self.log.info("forgot peer %s: no answer after %d tries", peer_id, FORGET_AFTER_FAILURES)
        partner = self.peers.choose(self.rng)
        if partner is None or len(self.peers) >= MAX_PEERS:
            return
        entries = await self._fetch(partner.url, partner.id)
        ignored = {p["id"] for p in self.peers.ignored()}
        fresh = [
            e["url"]
            for e in entries
            if e["id"] != self.peers.self_id and e["id"] not in self.peers and e["id"] not in ignored
        ]
        for url in fresh[: self.max_new]:
            await self.prober.probe(url, SOURCE)

    async def _fetch(self, url: str, partner: str) -> list[dict[str, str]]:
        """The partner's peer list (a signed read, answered by that member), keeping only well-formed entries
        of this node's scheme; [] when it cannot be read."""
        try:
            doc, _ = await get_json(
                self.session_factory(),
                self.prober.membership,
                url + "/v1/peers",
                MAX_LIST_BYTES,
                PEER_READ_TIMEOUT,
                expect=partner,  # an answer from any other node is refused (Unauthorized)
            )
        except (TimeoutError, aiohttp.ClientError, TooLarge, ValueError, Unauthorized) as e:
            self.log.debug("peer list of %s unreadable: %s", url, str(e) or type(e).__name__)
            return []
        rows = doc.get("peers") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            return []
        out, scheme = [], self.prober.membership.scheme
        for r in rows[:MAX_PEERS]:
            if isinstance(r, dict) and isinstance(r.get("id"), str) and (base := _base_url(r.get("url"), scheme)):
                out.append({"id": r["id"], "url": base})
        return out


def _base_url(url: object, scheme: str = "http") -> str | None:
    """``SCHEME://host:port`` of a listed peer, or None for anything else (another scheme, paths, credentials,
    queries)."""
    if not isinstance(url, str):
        return None
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return None
    if u.scheme != scheme or not u.hostname or port is None or u.username or u.path.strip("/") or u.query:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{scheme}://{host}:{port}"

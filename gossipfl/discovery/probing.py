"""Learning a peer's identity from its ``GET /v1/status``: shared by static seeds, DNS discovery and
peer exchange, which only know an address."""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from gossipfl.common.httpio import MAX_STATUS_BYTES, PEER_READ_TIMEOUT, TooLarge
from gossipfl.discovery.identity import Identity
from gossipfl.discovery.peers import PeerTable
from gossipfl.security.http import get_json
from gossipfl.security.membership import SHUN_S, Membership
from gossipfl.security.signing import Unauthorized
from gossipfl.security.tls import canonical


class Prober:
    def __init__(
        self,
        *,
        identity: Identity,
        peers: PeerTable,
        session_factory: Callable[[], aiohttp.ClientSession],
        log: logging.LoggerAdapter,
        membership: Membership | None = None,
    ) -> None:
        self.identity = identity
        self.membership = membership or Membership(peers.self_id)
        self.peers = peers
        self.session_factory = session_factory
        self.log = log
        self.last_error = ""  # why the last probe found nothing (for callers that report it)

    async def probe(self, url: str, source: str, claimed: str | None = None) -> str:
        """Ask ``url`` who it is and add it to the peer table as learned from ``source``. Returns "added",
        "known" (already in the table at this URL), "self", "ignored" (another task, model shape or
        cluster; or it failed authentication: listed under ignored peers with the reason) or "unreachable".
        The read is signed, and its answer accepted only from a member (see security/http.py)."""
        if self.peers.shunned(url):
            return "ignored"
        try:
            status, who = await get_json(
                self.session_factory(), self.membership, url + "/v1/status", MAX_STATUS_BYTES, PEER_READ_TIMEOUT
            )
            peer_id, task = str(status["id"]), str(status["task"])  # type: ignore[index]
            if who is not None and who != peer_id:
                raise Unauthorized(f"status says {peer_id!r} but the node authenticated as {who!r}")
            if self.membership.tls is not None and peer_id != self.peers.self_id:
                if not canonical(peer_id):
                    raise Unauthorized(
                        f"id {peer_id!r} cannot be bound to a certificate (not lowercase, or ends in '.')"
                    )
                await self._certified(url, peer_id)
            found = {k: _text(status.get(k)) for k in ("model", "split")}
            found.update(
                task=task,
                proto=str(status.get("protocol", 1)),  # nodes before protocol 2 did not say
                cluster=str(status.get("cluster", "default")),
                merge=_text((status.get("merge") or {}).get("rule")),
                init=_text(status.get("init_model")),
                scheme=urlsplit(url).scheme,  # it answered on this scheme
                exchange="group" if isinstance(status.get("group"), dict) else "pairwise",  # --secure-group
            )
        except Unauthorized as e:  # listed under its address: the id it claims is unproven (maybe a member's)
            said = f" (announced as {claimed!r})" if claimed else ""
            if self.peers.ignore(url, url, f"authentication{said}: {e}", for_s=SHUN_S):
                self.log.warning("ignoring %s peer %s for %.0f s: authentication: %s", source, url, SHUN_S, e)
            return "ignored"
        except (TimeoutError, aiohttp.ClientError, TooLarge, ValueError, KeyError, TypeError, AttributeError) as e:
            self.last_error = str(e) or type(e).__name__
            self.log.debug("%s peer %s not reachable: %s", source, url, self.last_error)
            return "unreachable"
        if peer_id == self.peers.self_id:
            return "self"
        reason = self.identity.mismatch_of(found)
        if reason:
            known = self.peers.get(peer_id)
            if known is not None and known.url != url:  # someone else claims a peer's id: keep the peer
                self.log.warning("%s address %s claims to be %s but %s; ignored", source, url, peer_id, reason)
                return "ignored"
            if self.peers.ignore(peer_id, url, reason):
                self.log.warning("ignoring %s peer %s (%s): %s", source, url, peer_id, reason)
            return "ignored"
        if self.peers.upsert(peer_id, url, task, source):
            self.log.info("peer found (%s): %s at %s", source, peer_id, url)
            if caveat := self.identity.caveat(found["init"]):
                self.log.warning("peer %s: %s", peer_id, caveat)
            return "added"
        return "known"

    async def _certified(self, url: str, peer_id: str) -> None:
        """Unauthorized unless the node at ``url`` holds a certificate for ``peer_id``: its status named that
        id, and the first connection proved only that it is a member. Asks again, expecting that id (the
        TLS handshake checks it; with a cluster key too, the reply is signed)."""
        status, _ = await get_json(
            self.session_factory(), self.membership, url + "/v1/status", MAX_STATUS_BYTES, PEER_READ_TIMEOUT,
            expect=peer_id,
        )  # fmt: skip
        if not isinstance(status, dict) or status.get("id") != peer_id:
            raise Unauthorized(f"the node certified as {peer_id!r} did not say so in its status")


def _text(value: object) -> str | None:
    return None if value is None else str(value)

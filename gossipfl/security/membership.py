"""Who may gossip with this node, and how its own requests prove it is a member: the cluster key, mutual
TLS, the allow-list and the read token, together. ``serving.auth`` applies it to requests; the exchange
and discovery apply it to the replies they read (``security.http``)."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gossipfl.common.chunks import Chunks
from gossipfl.security.signing import HEADER, ClusterKey, Signature, Unauthorized
from gossipfl.security.tls import TlsFiles, client_context

BEARER = "Bearer "
SHUN_S = 60.0  # an address whose node failed authentication is left alone (not contacted, not re-added) this long


@dataclass(frozen=True)
class Pending:
    """What a client keeps of a request it sent, to check the reply."""

    method: str
    target: str
    nonce: str | None  # None without a cluster key


@dataclass(frozen=True)
class Admitted:
    """A request whose head passed ``Membership.check_head``."""

    member: str | None  # the authenticated node id (None on an open node)
    signed: Signature | None  # its cluster-key signature, to check the body against


@dataclass
class Membership:
    node_id: str
    key: ClusterKey | None = None
    tls: TlsFiles | None = None
    read_token: str | None = field(default=None, repr=False)
    allow: frozenset[str] | None = None
    _contexts: dict[bool, ssl.SSLContext] = field(default_factory=dict, repr=False)

    def client_tls(self, expect: str | None) -> dict[str, Any]:
        """Request options for a connection to a peer: with mutual TLS, this node's client certificate and,
        when the peer's id is known (``expect``), a handshake that succeeds only if the peer's certificate
        names that id. Empty without TLS."""
        if self.tls is None:
            return {}
        check = expect is not None
        if check not in self._contexts:
            self._contexts[check] = client_context(self.tls, check_id=check)
        return {"ssl": self._contexts[check], "server_hostname": expect} if check else {"ssl": self._contexts[check]}

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def members_only(self) -> bool:
        """Whether gossip needs proof of membership (else the node runs open)."""
        return self.key is not None or self.tls is not None

    def describe(self) -> dict[str, Any]:
        """For ``/v1/status``: the mechanisms in force, never a secret (the key's fingerprint only)."""
        modes = [m for m, on in (("cluster-key", self.key), ("mutual-tls", self.tls)) if on is not None]
        return {
            "mode": "+".join(modes) or "open",
            "scheme": self.scheme,
            "read_token": self.read_token is not None,
            "allow_ids": sorted(self.allow) if self.allow is not None else None,
        }

    # -- client side: requests this node sends, replies it reads ---------------------------------------
    def sign(
        self, method: str, target: str, body: bytes = b"", to: str | None = None
    ) -> tuple[dict[str, str], Pending]:
        """Headers for a request to the node ``to`` (None: a read of a node whose id is not known yet)."""
        if self.key is None:
            return {}, Pending(method, target, None)
        header, nonce = self.key.sign_request(method, target, self.node_id, to or "", body)
        return {HEADER: header}, Pending(method, target, nonce)

    def check_reply(
        self, pending: Pending, status: int, headers: Mapping[str, str], body: bytes, expect: str | None
    ) -> str | None:
        """The responder's authenticated id (None on an open node, and with TLS alone when no id was expected:
        the handshake proved membership only); Unauthorized when the reply does not come from a member, or
        from another member than ``expect`` (the id the peer is known by, if any). With TLS, a connection
        made with ``client_tls(expect)`` already proved ``expect``."""
        who: str | None = expect if self.tls is not None else None
        if self.key is not None:
            assert pending.nonce is not None
            signer = self.key.verify_reply(
                headers.get(HEADER), status, pending.method, pending.target, pending.nonce, body
            )
            if who is not None and signer != who:
                raise Unauthorized(f"reply signed as {signer!r} over a connection certified for {who!r}")
            who = signer
        if who is not None and expect is not None and who != expect:
            raise Unauthorized(f"the peer authenticated as {who!r}, expected {expect!r}")
        if who is not None and self.allow is not None and who not in self.allow:
            raise Unauthorized(f"{who!r} is not in this node's allow-ids")
        return who

    # -- server side: requests this node answers -------------------------------------------------------
    def check_head(
        self, method: str, target: str, headers: Mapping[str, str], length: int, cert_id: str | None
    ) -> Admitted:
        """Whether a request to a members-only route comes from a member in good standing, as far as its head
        tells (before any body is read): its certificate, the signature of its head (fresh, for this node, a
        new nonce), the allow-list. Unauthorized otherwise. An open node admits everyone, anonymously."""
        if not self.members_only:
            return Admitted(None, None)
        who, signed = None, None
        if self.tls is not None:
            if cert_id is None:
                raise Unauthorized("a client certificate from the cluster CA is required")
            who = cert_id
        if self.key is not None:
            signed = self.key.check_head(method, target, headers.get(HEADER), self.node_id, length)
            if who is not None and signed.signer != who:
                raise Unauthorized(f"request signed as {signed.signer!r} over a connection certified for {who!r}")
            who = signed.signer
        if self.allow is not None and who not in self.allow:
            raise Unauthorized(f"{who!r} is not in this node's allow-ids")
        return Admitted(who, signed)

    def check_body(self, admitted: Admitted, method: str, target: str, body: bytes) -> Pending:
        """Finish checking an admitted request once its body is read; what the reply's signature needs."""
        if self.key is not None and admitted.signed is not None:
            self.key.check_body(admitted.signed, method, target, body)
            return Pending(method, target, admitted.signed.nonce)
        return Pending(method, target, None)

    def reply_headers(self, pending: Pending, status: int, body: bytes | Chunks) -> dict[str, str]:
        if self.key is None or pending.nonce is None:
            return {}
        return {HEADER: self.key.sign_reply(status, pending.method, pending.target, pending.nonce, self.node_id, body)}

    def bearer_ok(self, authorization: str | None) -> bool:
        """Whether ``Authorization`` carries the read token (constant-time); True when none is required."""
        if self.read_token is None:
            return True
        if not authorization or not authorization.startswith(BEARER):
            return False
        given = authorization[len(BEARER) :].strip().encode("utf-8", "surrogateescape")  # any bytes: no 500
        return hmac.compare_digest(given, self.read_token.encode())

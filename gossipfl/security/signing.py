"""The cluster key: HMAC-SHA256 signatures on node-to-node requests and their replies.

A request carries ``Gossipfl-Signature: v1 id=SENDER,to=RECIPIENT,ts=UNIX_SECONDS,nonce=HEX32,hsig=HEX64,
sig=HEX64``. ``hsig`` is a MAC over the request's head: method, path and query, sender, recipient, timestamp,
nonce and body length, so a responder can refuse a non-member, a stale or replayed request, or one meant
for another node before it reads a body or reserves room for it; ``sig`` adds the SHA-256 of the body and is
checked once the body is read. The recipient is the node id the sender means to reach (empty for a read of
a node whose id it does not know yet, allowed on GET only), so a request captured on its way to one node is
refused by every other. The reply carries the same header with the responder's id and a MAC over its
status, the request it answers (method, path, the request's nonce) and the SHA-256 of its body: a reply
cannot be forged, altered or replayed to another request. Comparisons are constant-time; the key,
signatures and bodies never appear in messages.

Pure but for the clock and the nonce book, which the caller owns (one per node)."""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gossipfl.common.chunks import Chunks

HEADER = "Gossipfl-Signature"
WINDOW_S = 30.0  # a request or reply more than this far from the receiver's clock is refused
MAX_NONCES = 1 << 17  # nonces remembered within the window; beyond, requests are refused (not forgotten)
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_HEADER_RE = re.compile(
    rf"^v1 id=(?P<id>{_ID}),to=(?P<to>(?:{_ID})?),ts=(?P<ts>\d{{1,12}}),"
    r"nonce=(?P<nonce>[0-9a-f]{32}),hsig=(?P<hsig>[0-9a-f]{64}),sig=(?P<sig>[0-9a-f]{64})$"
)


class Unauthorized(Exception):
    """A request or reply failed authentication; the message says why, without any secret."""


class Overloaded(Exception):
    """Too many signed requests within the replay window to remember their nonces: HTTP 503, retry later
    (not an authentication failure: the caller must not shun this node for it)."""


@dataclass(frozen=True)
class Signature:
    signer: str  # node id of the sender (a request) or responder (a reply)
    to: str  # the recipient's node id ("" when the sender did not know it; a reply: the request's sender)
    ts: int
    nonce: str  # the request's nonce (a reply repeats it)
    hsig: str  # MAC of the head (a reply: unused, zeros)
    sig: str


def parse(value: str | None) -> Signature:
    """The fields of a ``Gossipfl-Signature`` header; Unauthorized when it is missing or malformed."""
    if value is None:
        raise Unauthorized(f"missing {HEADER} header (this node requires the cluster key)")
    m = _HEADER_RE.match(value)
    if m is None:
        raise Unauthorized(f"malformed {HEADER} header")
    return Signature(m["id"], m["to"], int(m["ts"]), m["nonce"], m["hsig"], m["sig"])


def render(s: Signature) -> str:
    return f"v1 id={s.signer},to={s.to},ts={s.ts},nonce={s.nonce},hsig={s.hsig},sig={s.sig}"


def digest(body: bytes | bytearray | Chunks) -> str:
    """SHA-256 of a body, read piece by piece when it is made of pieces (never joined)."""
    if not isinstance(body, Chunks):
        return hashlib.sha256(body).hexdigest()
    h = hashlib.sha256()
    for part in body:
        h.update(part)
    return h.hexdigest()


def head_message(method: str, target: str, s: Signature, length: int) -> bytes:
    return "\n".join(
        ("gossipfl-head-v1", method.upper(), target, s.signer, s.to, str(s.ts), s.nonce, str(length))
    ).encode()


def request_message(method: str, target: str, s: Signature, body: bytes | bytearray | Chunks) -> bytes:
    return head_message(method, target, s, len(body)) + b"\n" + digest(body).encode()


def reply_message(
    status: int, method: str, target: str, nonce: str, responder: str, ts: int, body_digest: str
) -> bytes:
    parts = ("gossipfl-reply-v1", str(status), method.upper(), target, nonce, responder, str(ts), body_digest)
    return "\n".join(parts).encode("utf-8", "surrogateescape")


class NonceBook:
    """Nonces seen within the window, each kept until no request carrying it could be fresh again."""

    def __init__(self, limit: int = MAX_NONCES) -> None:
        self.limit = limit
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def add(self, nonce: str, until: float, now: float) -> str:
        """Record ``nonce``; "" if it was new, else why it is refused (a replay, or the book is full)."""
        while self._heap and self._heap[0][0] < now:
            _, old = heapq.heappop(self._heap)
            if self._until.get(old, now + 1) < now:
                del self._until[old]
        if nonce in self._until:
            return "nonce already used (a replayed request)"
        if len(self._until) >= self.limit:
            return "too many signed requests within the replay window; retry later"
        self._until[nonce] = until
        heapq.heappush(self._heap, (until, nonce))
        return ""


class ClusterKey:
    """One node's use of the shared cluster key: signs what it sends, checks what it receives."""

    def __init__(
        self, key: bytes, *, clock: Callable[[], float] = time.time, window: float = WINDOW_S, nonces: int = MAX_NONCES
    ) -> None:
        if not key:
            raise ValueError("empty key")
        self._key = key
        self.clock = clock
        self.window = window
        self.nonces = NonceBook(nonces)
        # a fingerprint for the log (to tell two keys apart), from which the key cannot be recovered
        self.key_id = hashlib.sha256(b"gossipfl key id\n" + key).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"ClusterKey(key_id={self.key_id})"

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _fresh(self, ts: int, what: str) -> None:
        skew = ts - self.clock()
        if abs(skew) > self.window:
            raise Unauthorized(f"{what} timestamp {skew:+.0f} s from this node's clock (window +-{self.window:g} s)")

    def sign_request(
        self, method: str, target: str, sender: str, to: str, body: bytes | bytearray | Chunks = b""
    ) -> tuple[str, str]:
        """(header value, nonce) for a request from ``sender`` to the node ``to`` ("" if not known yet);
        keep the nonce to check the reply."""
        head = Signature(sender, to, int(self.clock()), secrets.token_hex(16), "", "")
        hsig = self._mac(head_message(method, target, head, len(body)))
        sig = self._mac(request_message(method, target, head, body))
        return render(Signature(head.signer, to, head.ts, head.nonce, hsig, sig)), head.nonce

    def check_head(self, method: str, target: str, header: str | None, recipient: str, length: int) -> Signature:
        """The signature of a request whose head is signed with this key, fresh, meant for ``recipient``
        (or for anyone, on GET), its nonce not seen before (recorded now); Unauthorized otherwise. The body
        is checked later, once read (``check_body``)."""
        s = parse(header)
        if not hmac.compare_digest(self._mac(head_message(method, target, s, length)), s.hsig):
            raise Unauthorized("bad signature (another cluster key, or the request was altered)")
        if s.to != recipient and not (s.to == "" and method.upper() == "GET"):
            raise Unauthorized(f"request meant for {s.to or 'any node'!r}, not this node")
        self._fresh(s.ts, "request")
        if refused := self.nonces.add(s.nonce, s.ts + self.window, self.clock()):
            raise (Overloaded if refused.startswith("too many") else Unauthorized)(refused)
        return s

    def check_body(self, s: Signature, method: str, target: str, body: bytes) -> None:
        if not hmac.compare_digest(self._mac(request_message(method, target, s, body)), s.sig):
            raise Unauthorized("bad signature over the body (another cluster key, or the body was altered)")

    def verify_request(
        self, method: str, target: str, header: str | None, recipient: str, body: bytes = b""
    ) -> Signature:
        """``check_head`` then ``check_body``: a request whose body is at hand."""
        s = self.check_head(method, target, header, recipient, len(body))
        self.check_body(s, method, target, body)
        return s

    def sign_reply(
        self, status: int, method: str, target: str, nonce: str, responder: str, body: bytes | bytearray | Chunks
    ) -> str:
        ts = int(self.clock())
        sig = self._mac(reply_message(status, method, target, nonce, responder, ts, digest(body)))
        return render(Signature(responder, "", ts, nonce, "0" * 64, sig))

    def verify_reply(self, header: str | None, status: int, method: str, target: str, nonce: str, body: bytes) -> str:
        """The responder id of a correctly signed reply to the request that carried ``nonce`` (which is what
        makes it fresh: its timestamp is not checked, so that a large reply may take its time)."""
        if header is None:
            raise Unauthorized("reply not signed (the peer does not hold the cluster key)")
        s = parse(header)
        if not hmac.compare_digest(s.nonce, nonce):
            raise Unauthorized("reply signed for another request")
        expected = self._mac(reply_message(status, method, target, nonce, s.signer, s.ts, digest(body)))
        if not hmac.compare_digest(expected, s.sig):
            raise Unauthorized("reply has a bad signature (another cluster key, or it was altered)")
        return s.signer

"""Node-to-node HTTP as a member: sign the request, read the reply whole (size-limited), and accept it only
from the member expected. Used by the exchange and by discovery's probes and peer-list reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from gossipfl.common.chunks import Chunks, ChunksPayload
from gossipfl.common.httpio import BodyError, read_limited
from gossipfl.security.membership import Membership, Pending
from gossipfl.security.signing import Unauthorized

ERROR_TEXT_LIMIT = 512
HASH_IN_THREAD = 1 << 20  # bodies larger than this are signed and checked in a worker thread
T = TypeVar("T")


async def hashing(nbytes: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, which hashes a body of ``nbytes``: in a worker thread when the body is larger
    than HASH_IN_THREAD (hashing 100 MB takes ~50 ms, too long for the event loop), else right here."""
    if nbytes > HASH_IN_THREAD:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes | bytearray  # whole when status is 200; at most ERROR_TEXT_LIMIT bytes of an error reply
    peer: str | None  # the responder's authenticated id (None on an open node)


async def call(
    session: aiohttp.ClientSession,
    membership: Membership,
    method: str,
    url: str,
    *,
    body: bytes | Chunks = b"",
    limit: int,
    timeout: aiohttp.ClientTimeout,
    expect: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Send a signed request; the reply, checked. Unauthorized when the peer refused this node's
    credentials (401) or a 200 reply does not come from the member expected: nothing of it may be used.
    An error reply (not 200) is returned unchecked, trimmed: it carries nothing to merge, and the
    connection limit's 503 comes before any route could sign it. Raises aiohttp errors, TimeoutError,
    TooLarge and BodyError as reading does."""
    target = URL(url).raw_path_qs
    signed, pending = await hashing(len(body), membership.sign, method, target, body, to=expect)
    try:
        return await _call(session, membership, method, url, body, signed, pending, limit, timeout, expect, headers)
    except aiohttp.ClientSSLError as e:  # a certificate from another CA (either side), or for another id
        raise Unauthorized(f"TLS handshake failed: {_ssl_reason(e)}") from None


def _ssl_reason(e: aiohttp.ClientSSLError) -> str:
    inner = getattr(e, "certificate_error", None) or getattr(e, "os_error", None) or e
    return getattr(inner, "verify_message", None) or getattr(inner, "reason", None) or type(inner).__name__


async def _call(
    session: aiohttp.ClientSession,
    membership: Membership,
    method: str,
    url: str,
    body: bytes | Chunks,
    signed: dict[str, str],
    pending: Pending,
    limit: int,
    timeout: aiohttp.ClientTimeout,
    expect: str | None,
    headers: dict[str, str] | None,
) -> Reply:
    data = ChunksPayload(body, content_type="application/octet-stream") if isinstance(body, Chunks) else body
    async with session.request(
        method,
        url,
        data=data if method != "GET" else None,
        headers={**(headers or {}), **signed},
        timeout=timeout,
        allow_redirects=False,
        **membership.client_tls(expect),
    ) as resp:
        if resp.status != 200:
            try:
                text = await asyncio.wait_for(resp.content.read(ERROR_TEXT_LIMIT), 2.0)
            except (aiohttp.ClientError, TimeoutError):
                text = b""
            if resp.status == 401:
                raise Unauthorized(f"the peer refused this node's credentials: {error_text(text)}")
            return Reply(resp.status, text, None)
        raw = await read_limited(resp.content, resp.content_length, limit)
        who = await hashing(len(raw), membership.check_reply, pending, resp.status, resp.headers, raw, expect)
    return Reply(resp.status, raw, who)


async def get_json(
    session: aiohttp.ClientSession,
    membership: Membership,
    url: str,
    limit: int,
    timeout: aiohttp.ClientTimeout,
    expect: str | None = None,
) -> tuple[object, str | None]:
    """A member's GET of a JSON document: (document, the responder's authenticated id, see ``call``). Raises
    Unauthorized, aiohttp.ClientError, TimeoutError, TooLarge, or ValueError (not 200, not JSON, cut short)."""
    try:
        reply = await call(session, membership, "GET", url, limit=limit, timeout=timeout, expect=expect)
    except BodyError as e:
        raise ValueError(str(e)) from None
    if reply.status != 200:
        raise ValueError(f"HTTP {reply.status}")
    try:
        return json.loads(reply.body), reply.peer
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def error_text(raw: bytes) -> str:
    """A short, printable account of an error body, whatever its bytes."""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except ValueError:
        pass
    return "".join(c if c.isprintable() else "?" for c in text[:200])

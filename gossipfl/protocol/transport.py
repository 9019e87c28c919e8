"""The HTTP side of an exchange, as an initiator sees it: timeouts that grow with the model's size, the
two requests (prepare, then commit or abort), and a printable account of an error reply whatever its
bytes."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from gossipfl.common.httpio import BodyError, TooLarge, read_limited
from gossipfl.protocol import wire
from gossipfl.protocol.ledger import ABORTED, COMMITTED
from gossipfl.protocol.stats import ExchangeStats

CONNECT_TIMEOUT_S = 2.0
BASE_TIMEOUT_S = 2.0  # a prepare of a small model: connect, send, the peer's snapshot, the reply
MIN_THROUGHPUT = 8e6  # bytes/s assumed of the slowest link, for the size-dependent part of timeouts
ERROR_TEXT_LIMIT = 512


def timeout_for(nbytes: int) -> float:
    """Seconds allowed for one request or body carrying ``nbytes`` (both directions of an exchange)."""
    return BASE_TIMEOUT_S + 2 * nbytes / MIN_THROUGHPUT


class ExchangeError(Exception):
    """The peer answered, but not with a usable reply."""


class PeerBusy(ExchangeError):
    """The peer answered 409."""


async def error_text(resp: aiohttp.ClientResponse) -> str:
    """A short, printable account of an error reply, whatever its bytes (never raises on bad encoding)."""
    try:
        raw = await asyncio.wait_for(resp.content.read(ERROR_TEXT_LIMIT), BASE_TIMEOUT_S)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]
    except ValueError:
        pass
    return "".join(c if c.isprintable() else "?" for c in text[:200])


async def post_prepare(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    timeout: aiohttp.ClientTimeout,
    max_body: int,
    stats: ExchangeStats,
) -> bytes:
    """POST the prepare to the peer at ``url``; the peer's reply. Retried once, with the same xid, if the
    connection broke before the reply came whole (the peer answers a retried prepare with the same reply).
    Raises PeerBusy (409), ExchangeError (another status), aiohttp errors, TimeoutError, TooLarge,
    BodyError."""
    for attempt in (0, 1):
        try:
            async with session.post(
                url + "/v1/gossip",
                data=body,
                timeout=timeout,
                headers={"Content-Type": wire.CONTENT_TYPE},
                allow_redirects=False,
            ) as resp:
                stats.bytes_sent += len(body)
                if resp.status == 409:
                    raise PeerBusy(await error_text(resp))
                if resp.status != 200:
                    raise ExchangeError(f"HTTP {resp.status}: {await error_text(resp)}")
                raw = await read_limited(resp.content, resp.content_length, max_body)
                stats.bytes_received += len(raw)
                return raw
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, BodyError):
            if attempt:  # once: a pooled connection the peer had closed, or a reply cut short
                raise
    raise AssertionError("unreachable")


async def post_decision(
    session: aiohttp.ClientSession, url: str, xid: str, decision: str, *, timeout: aiohttp.ClientTimeout
) -> str:
    """POST commit or abort; the responder's outcome. Raises ExchangeError, whatever went wrong, when
    there is no clear answer."""
    try:
        async with session.post(f"{url}/v1/gossip/{xid}/{decision}", timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ExchangeError(f"HTTP {resp.status}: {await error_text(resp)}")
            doc = json.loads(await read_limited(resp.content, resp.content_length, 4096))
    except ExchangeError:
        raise
    except (aiohttp.ClientError, TimeoutError, BodyError, TooLarge, ValueError, RecursionError) as e:
        raise ExchangeError(str(e) or type(e).__name__) from None
    outcome = doc.get("outcome") if isinstance(doc, dict) else None
    if outcome not in (COMMITTED, ABORTED) or (isinstance(doc, dict) and doc.get("xid") != xid):
        raise ExchangeError(f"no outcome for exchange {xid} in the answer to {decision}")
    return outcome

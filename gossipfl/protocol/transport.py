"""The HTTP side of an exchange, as an initiator sees it: timeouts that grow with the model's size, the
two requests (prepare, then commit or abort), and a printable account of an error reply whatever its
bytes."""

from __future__ import annotations

import json

import aiohttp

from gossipfl.common.chunks import Chunks
from gossipfl.common.httpio import BodyError, TooLarge
from gossipfl.protocol import wire
from gossipfl.protocol.budget import UploadBudget
from gossipfl.protocol.ledger import ABORTED, COMMITTED
from gossipfl.protocol.stats import ExchangeStats
from gossipfl.security.http import call, error_text
from gossipfl.security.membership import Membership
from gossipfl.security.signing import Unauthorized

RETRY_HEADER = "Gossipfl-Retry"  # on a retried prepare: the xid of the exchange it repeats
CONNECT_TIMEOUT_S = 2.0
BASE_TIMEOUT_S = 2.0  # a prepare of a small model: connect, send, the peer's snapshot, the reply
MIN_THROUGHPUT = 8e6  # bytes/s assumed of the slowest link, for the size-dependent part of timeouts


def timeout_for(nbytes: int) -> float:
    """Seconds allowed for one request or body carrying ``nbytes`` (both directions of an exchange)."""
    return BASE_TIMEOUT_S + 2 * nbytes / MIN_THROUGHPUT


class ExchangeError(Exception):
    """The peer answered, but not with a usable reply."""


class PeerBusy(ExchangeError):
    """The peer answered 409."""


async def post_prepare(
    session: aiohttp.ClientSession,
    membership: Membership,
    url: str,
    peer_id: str,
    body: bytes | Chunks,
    *,
    xid: str,
    timeout: aiohttp.ClientTimeout,
    max_body: int,
    stats: ExchangeStats,
    upload: UploadBudget,
) -> bytearray:
    """POST the prepare of exchange ``xid`` to the peer ``peer_id`` at ``url``; its reply, signed by that
    member when the cluster has a key (see security/http.py). Retried once, with the same xid, if the
    connection broke before the reply came whole: the retry says so (RETRY_HEADER), so that the peer, whose
    room the first attempt may hold, answers it with the same reply. Each attempt counts against ``upload``.
    Raises PeerBusy (409), ExchangeError (another status, or a 409 to the retry: the first attempt may be
    prepared there, and must be aborted), Unauthorized, aiohttp errors, TimeoutError, TooLarge, BodyError."""
    for attempt in (0, 1):
        headers = {"Content-Type": wire.CONTENT_TYPE, **({RETRY_HEADER: xid} if attempt else {})}
        upload.spend(len(body))
        try:
            reply = await call(
                session,
                membership,
                "POST",
                url + "/v1/gossip",
                body=body,
                limit=max_body,
                timeout=timeout,
                expect=peer_id,
                headers=headers,
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, BodyError):
            if attempt:  # once: a pooled connection the peer had closed, or a reply cut short
                raise
            continue
        stats.bytes_sent += len(body)
        if reply.status == 409:
            if attempt:
                raise ExchangeError(f"retry refused: {error_text(reply.body)}")
            raise PeerBusy(error_text(reply.body))
        if reply.status != 200:
            raise ExchangeError(f"HTTP {reply.status}: {error_text(reply.body)}")
        stats.bytes_received += len(reply.body)
        return reply.body
    raise AssertionError("unreachable")


async def post_decision(
    session: aiohttp.ClientSession,
    membership: Membership,
    url: str,
    peer_id: str,
    xid: str,
    decision: str,
    *,
    timeout: aiohttp.ClientTimeout,
) -> str:
    """POST commit or abort; the responder's outcome. Raises Unauthorized when the answer does not come
    from that member, ExchangeError, whatever else went wrong, when there is no clear answer."""
    try:
        reply = await call(
            session,
            membership,
            "POST",
            f"{url}/v1/gossip/{xid}/{decision}",
            limit=4096,
            timeout=timeout,
            expect=peer_id,
        )
        if reply.status != 200:
            raise ExchangeError(f"HTTP {reply.status}: {error_text(reply.body)}")
        doc = json.loads(reply.body)
    except (ExchangeError, Unauthorized):
        raise
    except (aiohttp.ClientError, TimeoutError, BodyError, TooLarge, ValueError, RecursionError) as e:
        raise ExchangeError(str(e) or type(e).__name__) from None
    outcome = doc.get("outcome") if isinstance(doc, dict) else None
    if outcome not in (COMMITTED, ABORTED) or (isinstance(doc, dict) and doc.get("xid") != xid):
        raise ExchangeError(f"no outcome for exchange {xid} in the answer to {decision}")
    return outcome

"""HTTP body reading shared by the routes, the exchange and discovery: size-limited, deadline-bound
reads, and the timeout of a read from a peer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


class TooLarge(Exception):
    """A body is larger than the limit; nothing beyond the limit was buffered."""


class BodyError(Exception):
    """A body did not arrive whole: the other side hung up, broke the framing, or was too slow."""


class BodyTimeout(BodyError):
    """A body did not arrive whole within its deadline (HTTP 408)."""


STALL_S = 10.0  # a body (or a reply) from which no byte came for this long is cut off


async def read_limited(
    content: aiohttp.StreamReader,
    declared: int | None,
    limit: int,
    deadline: float | None = None,
    stall: float | None = None,
) -> bytearray:
    """Read ``content`` whole, refusing (TooLarge) a declared or actual size over ``limit`` bytes, and
    (BodyError) a body cut short, badly framed, or (BodyTimeout) not whole within ``deadline`` seconds or
    stalled: no byte for ``stall`` seconds (default STALL_S; a large body's deadline is long, a sender that
    stops is cut off sooner).
    The body is read into one buffer, grown as it comes (a large buffer grows by remapping its pages, not
    by copying them; one that is declared but never sent costs nothing); the result is that buffer,
    writable: a message's tensors are decoded in it, without a copy."""
    if declared is not None and declared > limit:
        raise TooLarge(f"body of {declared} bytes exceeds {limit}")
    buf = bytearray()
    stall = STALL_S if stall is None else stall
    timer = asyncio.timeout(deadline)
    try:
        async with timer:
            while True:
                quiet = asyncio.timeout(stall)
                try:
                    async with quiet:
                        chunk = await content.readany()
                except TimeoutError:
                    if not quiet.expired():  # the deadline's, or a caller's own
                        raise
                    raise BodyTimeout(f"body stalled: no data for {stall:g} s ({len(buf)} bytes came)") from None
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise TooLarge(f"body exceeds {limit} bytes")
    except TimeoutError:
        if not timer.expired():  # a caller's own timeout (the client's total): not ours to explain
            raise
        raise BodyTimeout(f"body not received within {deadline:g} s ({len(buf)} bytes came)") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, web.RequestPayloadError, ConnectionError) as e:
        raise BodyError(f"body cut short after {len(buf)} bytes: {type(e).__name__}") from None
    if declared is not None and len(buf) != declared:
        raise BodyError(f"body of {len(buf)} bytes, {declared} declared")
    return buf


PEER_READ_TIMEOUT = aiohttp.ClientTimeout(total=5.0, sock_connect=2.0)
MAX_STATUS_BYTES = 256 * 1024  # a peer's /v1/status read by another node (a probe, a joining node)

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
    A declared size is read straight into one buffer of that size (each byte is copied once, from the
    connection's buffer); the result is that buffer, writable (a message's tensors are decoded in it)."""
    if declared is not None and declared > limit:
        raise TooLarge(f"body of {declared} bytes exceeds {limit}")
    buf = bytearray(declared) if declared is not None else bytearray()
    view = memoryview(buf) if declared is not None else None
    got, stall = 0, STALL_S if stall is None else stall
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
                    raise BodyTimeout(f"body stalled: no data for {stall:g} s ({got} bytes came)") from None
                if not chunk:
                    break
                n = len(chunk)
                if view is not None:
                    if got + n > len(buf):
                        raise BodyError(f"body longer than the {declared} bytes declared")
                    view[got : got + n] = chunk
                else:
                    buf += chunk
                got += n
                if got > limit:
                    raise TooLarge(f"body exceeds {limit} bytes")
    except TimeoutError:
        if not timer.expired():  # a caller's own timeout (the client's total): not ours to explain
            raise
        raise BodyTimeout(f"body not received within {deadline:g} s ({got} bytes came)") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, web.RequestPayloadError, ConnectionError) as e:
        raise BodyError(f"body cut short after {got} bytes: {type(e).__name__}") from None
    finally:
        if view is not None:
            view.release()
    if declared is not None and got != declared:
        raise BodyError(f"body of {got} bytes, {declared} declared")
    return buf


PEER_READ_TIMEOUT = aiohttp.ClientTimeout(total=5.0, sock_connect=2.0)
MAX_STATUS_BYTES = 256 * 1024  # a peer's /v1/status read by another node (a probe, a joining node)

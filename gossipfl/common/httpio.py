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


async def read_limited(
    content: aiohttp.StreamReader, declared: int | None, limit: int, deadline: float | None = None
) -> bytearray:
    """Read ``content`` whole, refusing (TooLarge) a declared or actual size over ``limit`` bytes, and
    (BodyError) a body cut short, badly framed, or (BodyTimeout) not whole within ``deadline`` seconds.
    A declared size is read straight into one buffer of that size (each byte is copied once, from the
    connection's buffer); the result is that buffer, writable (a message's tensors are decoded in it)."""
    if declared is not None and declared > limit:
        raise TooLarge(f"body of {declared} bytes exceeds {limit}")
    buf = bytearray(declared) if declared is not None else bytearray()
    view = memoryview(buf) if declared is not None else None
    got = 0
    timer = asyncio.timeout(deadline)
    try:
        async with timer:
            async for chunk in content.iter_chunked(1 << 20):
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

"""Reading HTTP bodies with a size limit, for both sides of an exchange."""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """A body is larger than the limit; nothing beyond the limit was buffered."""


async def read_limited(content: aiohttp.StreamReader, declared: int | None, limit: int) -> bytes:
    """Read ``content`` whole, refusing (TooLarge) a declared or actual size over ``limit`` bytes."""
    if declared is not None and declared > limit:
        raise TooLarge(f"body of {declared} bytes exceeds {limit}")
    buf = bytearray()
    async for chunk in content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"body exceeds {limit} bytes")
    return bytes(buf)

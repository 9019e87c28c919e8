"""HTTP helpers shared by the routes and the gossip client: size-limited reads, the error shape, the
app key under which routes find their node."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .node import Node

NODE_KEY: web.AppKey[Node] = web.AppKey("node")


def error(status: int, message: str) -> web.Response:
    """The one error shape of every route: ``{"error": "..."}``."""
    return web.json_response({"error": message}, status=status)


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


async def get_json(session: aiohttp.ClientSession, url: str, limit: int) -> object:
    """GET ``url`` from a peer and parse its JSON body, read whole up to ``limit`` bytes; no redirects.
    Raises aiohttp.ClientError, TimeoutError, TooLarge, or ValueError (not 200, not JSON, nested too
    deeply to parse)."""
    async with session.get(url, allow_redirects=False) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        body = await read_limited(resp.content, resp.content_length, limit)
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None

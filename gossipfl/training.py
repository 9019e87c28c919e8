"""Periodic background work of a node: local training rounds and evaluations, in a worker thread."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def every(interval: float, stopping: asyncio.Event, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` then wait ``interval`` seconds, until ``stopping`` is set."""
    while not stopping.is_set():
        await work()
        try:
            await asyncio.wait_for(stopping.wait(), timeout=interval)
        except TimeoutError:
            pass

"""Asking again for a while: start-up steps that may succeed a little later (a DNS record, a replica's
name), with growing waits, a word on the first miss, and a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
WAITS = (0.5, 1.0, 2.0, 5.0)  # seconds between attempts (the last one repeats)


async def patiently(
    attempt: Callable[[], Awaitable[tuple[T | None, str]]],
    patience: float,
    on_first_miss: Callable[[str], None] | None = None,
) -> tuple[T | None, str, int]:
    """Await ``attempt()`` -> (value, why not) until it gives a value or ``patience`` seconds have passed:
    (the value or None, the last reason, the number of misses before the last attempt)."""
    loop = asyncio.get_running_loop()
    deadline, misses = loop.time() + patience, 0
    while True:
        value, reason = await attempt()
        if value is not None or loop.time() >= deadline:
            return value, reason, misses
        if misses == 0 and on_first_miss is not None:
            on_first_miss(reason)
        await asyncio.sleep(min(WAITS[min(misses, len(WAITS) - 1)], max(deadline - loop.time(), 0.0)))
        misses += 1

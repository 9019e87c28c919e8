"""Supervision of a node's background loops (training, evaluation, gossip, discovery).

A round that raises is counted and logged, and the loop goes on with its next round: the first error of
each kind is logged with its traceback, the 10th, 100th, 1000th... of that kind once more as a count,
the rest at debug level. Counts per loop and kind are in ``/v1/status`` (``loops``) and ``/metrics``
(``gossipfl_loop_errors_total``). A loop whose rounds fail ``max_consecutive`` times in a row, or a
supervised task that ends by an exception, cannot go on: that is fatal, the node stops and its process
exits non-zero, so that an orchestrator restarts it instead of leaving a node that looks healthy and
does nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

MAX_CONSECUTIVE = 10


def error_kind(exc: BaseException) -> str:
    """The exception's type and where it was raised (innermost frame): one kind per bug, whatever the
    numbers in its message."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb is not None else ""
    return type(exc).__name__ + where


@dataclass
class LoopHealth:
    rounds: int = 0  # rounds that completed
    errors: int = 0
    consecutive: int = 0  # errors since the last round that completed
    kinds: Counter[str] = field(default_factory=Counter)  # error kind -> count
    types: Counter[str] = field(default_factory=Counter)  # exception type name -> count (metrics)
    last_error: str | None = None
    last_error_at: float | None = None
    running: bool = False

    def describe(self, now: float) -> dict:
        return {
            "running": self.running,
            "rounds": self.rounds,
            "errors": self.errors,
            "consecutive_errors": self.consecutive,
            "last_error": self.last_error,
            "last_error_s_ago": None if self.last_error_at is None else round(now - self.last_error_at, 3),
        }


class Supervisor:
    def __init__(
        self,
        log: logging.LoggerAdapter,
        *,
        on_fatal: Callable[[str], None],
        max_consecutive: int = MAX_CONSECUTIVE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.on_fatal = on_fatal
        self.max_consecutive = max_consecutive
        self.clock = clock
        self.loops: dict[str, LoopHealth] = {}
        self.fatal: str | None = None

    def health(self, name: str) -> LoopHealth:
        return self.loops.setdefault(name, LoopHealth())

    async def loop(
        self,
        name: str,
        interval: float | Callable[[], float],
        stopping: asyncio.Event,
        work: Callable[[], Awaitable[object] | object],
        *,
        first_wait: bool = False,
    ) -> None:
        """Run ``work`` every ``interval`` seconds (a number, or a function giving the next wait) until
        ``stopping`` is set; an error in one round is counted, not fatal, unless it repeats
        ``max_consecutive`` times in a row."""
        health = self.health(name)
        health.running = True
        try:
            if first_wait and await _wait(stopping, interval):
                return
            while not stopping.is_set():
                try:
                    result = work()
                    if inspect.isawaitable(result):
                        await result
                except Exception as e:  # noqa: BLE001 - every error of a round is counted here
                    self.error(name, e)
                    if health.consecutive >= self.max_consecutive:
                        self._fatal(f"{name} failed {health.consecutive} times in a row, last: {health.last_error}")
                        return
                else:
                    health.rounds += 1
                    health.consecutive = 0
                if await _wait(stopping, interval):
                    return
        finally:
            health.running = False

    def error(self, name: str, exc: BaseException, *, in_a_round: bool = True) -> None:
        """Count an error of loop ``name`` and log it as described above. An error outside the loop's own
        rounds (in a task the loop started) does not count towards ``max_consecutive``."""
        health = self.health(name)
        kind = error_kind(exc)
        health.errors += 1
        health.consecutive += in_a_round
        health.kinds[kind] += 1
        health.types[type(exc).__name__] += 1
        health.last_error = f"{kind}: {str(exc)[:300]}"
        health.last_error_at = self.clock()
        n = health.kinds[kind]
        if n == 1:
            self.log.error("%s: %s (first of its kind; counted in /v1/status loops)", name, exc, exc_info=exc)
        elif n in (10, 100, 1000, 10_000, 100_000):
            self.log.warning("%s: %s has now happened %d times (last: %s)", name, kind, n, str(exc)[:200])
        else:
            self.log.debug("%s: %s", name, health.last_error)

    def watch(self, task: asyncio.Task, name: str, stopping: asyncio.Event) -> None:
        """A supervised task must not end by an exception while the node runs: that is fatal."""

        def done(t: asyncio.Task) -> None:
            if t.cancelled() or stopping.is_set():
                return
            if (exc := t.exception()) is not None:
                self.error(name, exc)
                self._fatal(f"{name} ended: {type(exc).__name__}: {exc}")

        task.add_done_callback(done)

    def _fatal(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            self.log.critical("stopping: %s", reason)
            self.on_fatal(reason)

    def describe(self) -> dict[str, dict]:
        now = self.clock()
        return {name: h.describe(now) for name, h in sorted(self.loops.items())}


async def _wait(stopping: asyncio.Event, interval: float | Callable[[], float]) -> bool:
    """Wait ``interval`` or until ``stopping``; True when stopping."""
    delay = interval() if callable(interval) else interval
    try:
        await asyncio.wait_for(stopping.wait(), timeout=delay)
        return True
    except TimeoutError:
        return False

"""The upload budget (``--max-upload-rate``): what a node sends in exchanges (its prepares, as initiator,
and its replies, as responder) averages at most ``rate`` bytes per second, whatever the model's size and
codec. Each message sent puts the node ``bytes / rate`` seconds in debt; while in debt it starts no exchange
and answers prepares with 409 (busy), and it answers one prepare at a time, so over any stretch of time T
it sends at most ``rate * T`` plus one message (and a retry of it). The rate actually sent, budget or not,
is measured over the last ``WINDOW_S`` seconds."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10.0
MIN_SPAN_S = 1.0  # (the first second counts as a whole one)


class UploadBudget:
    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate  # bytes per second; None: no budget (the rate is still measured)
        self.clock = clock
        self._free_at = clock()  # when the debt of what was sent is paid
        self._sent: deque[tuple[float, int]] = deque()  # (when, bytes) within the window
        self._window_bytes = 0
        self._started = clock()
        self.total = 0

    def spend(self, nbytes: int) -> None:
        """Record a message of ``nbytes`` sent now."""
        now = self.clock()
        if self.rate is not None:
            self._free_at = max(self._free_at, now) + nbytes / self.rate
        self._sent.append((now, nbytes))
        self._window_bytes += nbytes
        self.total += nbytes
        self._trim(now)

    def wait(self) -> float:
        """Seconds until the node may send its next exchange message (0: now)."""
        return 0.0 if self.rate is None else max(0.0, self._free_at - self.clock())

    def measured(self) -> float:
        """Bytes per second sent over the last WINDOW_S seconds (or since the start, when that is shorter)."""
        now = self.clock()
        self._trim(now)
        span = max(MIN_SPAN_S, min(WINDOW_S, now - self._started))
        return self._window_bytes / span

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0][0] < now - WINDOW_S:
            self._window_bytes -= self._sent.popleft()[1]

"""Bounded records over time, read incrementally: what a dashboard polls (``GET /v1/history``). Each record
gets a sequence number (1, 2, ...): a reader asks for what came after the last one it saw."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any


class Timeline:
    """At most ``capacity`` records. ``thin=False``: the oldest are dropped (the last N). ``thin=True``: when
    full, every second record of the older half is dropped instead, so the whole run stays covered, in full
    detail recently and ever more coarsely further back."""

    def __init__(self, capacity: int, *, thin: bool = False) -> None:
        if capacity < 4:
            raise ValueError("a timeline keeps at least 4 records")
        self.capacity = capacity
        self.thin = thin
        self._seq = itertools.count(1)
        self._records: deque[dict[str, Any]] = deque(maxlen=None if thin else capacity)

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (a new dict with its ``seq``), returning it."""
        if self.thin and len(self._records) >= self.capacity:
            old = list(self._records)
            half = len(old) // 2
            self._records = deque(old[:half:2] + old[half:])
        entry = {"seq": next(self._seq), **record}
        self._records.append(entry)
        return entry

    def after(self, seq: int = 0) -> list[dict[str, Any]]:
        """The records whose sequence number is above ``seq``, oldest first."""
        return [r for r in self._records if r["seq"] > seq]

    def __len__(self) -> int:
        return len(self._records)

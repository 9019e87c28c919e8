"""Counts of one node's exchanges, both sides, as ``/v1/status`` and ``/metrics`` report them."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from gossipfl.common.timeline import Timeline

RECENT = 100  # exchanges kept for GET /v1/history (both sides)


@dataclass
class ExchangeStats:
    ok: int = 0  # exchanges this node started that committed
    failed: int = 0  # started exchanges that failed (peer down or hung, error reply, invalid reply)
    busy: int = 0  # started exchanges the peer declined with 409
    aborted: int = 0  # started exchanges aborted (overlapping merges, or the peer's decision)
    in_doubt: int = 0  # started exchanges whose commit went unanswered (counted in failed too)
    late: int = 0  # of those, committed by the peer and merged when this node learned it
    served: int = 0  # exchanges started by peers that this node committed
    declined: int = 0  # prepared exchanges this node aborted (expired, overlapping, unknown)
    rejected: int = 0  # incoming messages refused as invalid (4xx)
    unauthorized: int = 0  # started exchanges whose peer refused this node's credentials or could not prove its own
    bytes_sent: int = 0
    bytes_received: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=100), repr=False)
    recent: Timeline = field(default_factory=lambda: Timeline(RECENT), repr=False)  # the last exchanges, one each

    def record(
        self,
        peer: str,
        role: str,
        result: str,
        duration: float | None,
        sent: int = 0,
        received: int = 0,
        distance: float | None = None,
        error: str | None = None,
        at: float | None = None,
    ) -> None:
        """One exchange as the dashboard lists it: ``role`` "initiated" or "answered"; ``result`` as counted
        (ok, busy, aborted, failed, in_doubt, unauthorized; answered: ok, declined, rejected); ``distance``:
        how far the peer's model was from this node's, relative to this node's (consensus.relative_distance);
        ``at``: when it ended (wall clock; default now)."""
        self.recent.add(
            {
                "t": round(time.time() if at is None else at, 3),  # wall clock, when it ended
                "peer": peer,
                "role": role,
                "result": result,
                "duration_s": None if duration is None else round(duration, 4),
                "bytes_sent": sent,
                "bytes_received": received,
                "distance": distance,
                "error": None if error is None else error[:300],
            }
        )

    def as_dict(self) -> dict:
        d = sorted(self.durations)
        out = {k: v for k, v in self.__dict__.items() if k not in ("durations", "recent")}
        out["mean_duration_s"] = sum(d) / len(d) if d else None
        # the median and the 99th percentile (nearest rank) of the last 100 committed exchanges' durations
        out["p50_duration_s"] = d[(len(d) - 1) // 2] if d else None
        out["p99_duration_s"] = d[max(0, -(-99 * len(d) // 100) - 1)] if d else None
        return out

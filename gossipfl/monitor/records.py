"""What the network view keeps about one node, read from its ``/v1/status`` and ``/v1/history``.

A node's answers are read like any input from the network: a field of the wrong type is treated as absent,
strings are cut short, and every list is bounded. Times a node reports are on its own clock; each is moved
to the collector's with the node's ``now``, so curves of nodes whose clocks disagree line up, and kept only
if it falls between the node's start and now."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gossipfl.common.timeline import Timeline

SERIES_POINTS = 600  # accuracy points kept per node (the whole run, thinned further back)
EDGES_KEPT = 1000  # exchanges kept per node (only the last EDGE_WINDOW_S are shown)
MAX_ID = 255
MAX_TEXT = 300
TIME_MARGIN_S = 5.0  # a time converted with the node's ``now`` is off by about a network round trip, no more


def text(value: object, limit: int = MAX_TEXT) -> str | None:
    """``value`` when it is a string (cut to ``limit`` characters), else None."""
    return value[:limit] if isinstance(value, str) else None


def number(value: object) -> float | None:
    """``value`` as a finite float when it is a number (not a bool), else None (an integer too large for a
    float, valid JSON, too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _moved(t: object, offset: float, earliest: float, latest: float) -> float | None:
    """A node's time ``t`` on the collector's clock, or None when it is not a number or not in [earliest, latest]."""
    moved = number(t)
    if moved is None:
        return None
    moved += offset
    return moved if earliest <= moved <= latest else None


def count(value: object) -> int | None:
    n = number(value)
    return int(n) if n is not None else None


@dataclass
class NodeRecord:
    """One watched node: where it is, whether its last read worked, and what it said."""

    url: str
    id: str | None = None  # from its status (None until it answered once)
    reachable: bool | None = None  # None: not read yet
    error: str | None = None  # why the last read failed
    status: dict[str, Any] = field(default_factory=dict)  # the last status that was read
    last_ok: float | None = None  # collector clock
    evals_after: int = 0  # /v1/history cursors
    exchanges_after: int = 0
    uptime: float = -1.0
    boot: str | None = None  # the node's run, from /v1/history (new at every start)
    first_ok: float | None = None  # the first read of this node (collector clock)
    series: Timeline = field(default_factory=lambda: Timeline(SERIES_POINTS, thin=True))  # {"t", "accuracy"}
    edges: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=EDGES_KEPT))  # (peer id, t)

    @property
    def key(self) -> str:
        """How the page tells nodes apart: the id, or the url before the node first answered."""
        return self.id or self.url

    def failed(self, error: str) -> None:
        self.reachable, self.error = False, error[:MAX_TEXT]

    def take(self, status: object, history: object, received_at: float) -> None:
        """Record one successful read. Raises ValueError when the answers are not a gossipfl node's."""
        if not isinstance(status, dict) or not isinstance(history, dict):
            raise ValueError("not a gossipfl node: /v1/status or /v1/history is not a JSON object")
        node_id = text(status.get("id"), MAX_ID)
        if not node_id:
            raise ValueError("not a gossipfl node: its status has no id")
        uptime, boot = number(status.get("uptime_s")), text(history.get("boot"), MAX_ID)
        # restarted (a new boot id, or, from a node that sends none, its uptime falling): its sequence numbers
        # start again; this answer was asked for with the old cursors, so the new run is read from 0 next time
        new_boot = boot is not None and self.boot is not None and boot != self.boot
        restarted = new_boot or (uptime is not None and uptime < self.uptime)
        stale = node_id != self.id or restarted
        if node_id != self.id:  # another node at this address: start over
            self.series = Timeline(SERIES_POINTS, thin=True)
            self.edges.clear()
            self.first_ok = received_at
        self.id, self.uptime, self.boot = node_id, uptime if uptime is not None else -1.0, boot
        self.status, self.reachable, self.error, self.last_ok = status, True, None, received_at
        if stale and (self.evals_after, self.exchanges_after) != (0, 0):
            self.evals_after = self.exchanges_after = 0
            return
        node_now = number(history.get("now"))
        offset = received_at - node_now if node_now is not None else 0.0
        # a record is kept only if it happened between the node's start (from a node that sends no uptime,
        # the first read of it) and now: one node's times cannot stretch everyone's charts over years, or
        # keep an exchange in the last minute for ever
        started = received_at - uptime if uptime is not None and uptime >= 0 else (self.first_ok or received_at)
        when = (offset, started - TIME_MARGIN_S, received_at + TIME_MARGIN_S)
        self._evals(history.get("evals"), when)
        self._exchanges(history.get("exchanges"), when)

    def _evals(self, evals: object, when: tuple[float, float, float]) -> None:
        for e in evals if isinstance(evals, list) else []:
            if not isinstance(e, dict) or (seq := count(e.get("seq"))) is None or seq <= self.evals_after:
                continue
            self.evals_after = seq
            if (t := _moved(e.get("t"), *when)) is not None:
                self.series.add({"t": round(t, 3), "accuracy": number(e.get("accuracy"))})

    def _exchanges(self, exchanges: object, when: tuple[float, float, float]) -> None:
        for x in exchanges if isinstance(exchanges, list) else []:
            if not isinstance(x, dict) or (seq := count(x.get("seq"))) is None or seq <= self.exchanges_after:
                continue
            self.exchanges_after = seq
            peer, t = text(x.get("peer"), MAX_ID), _moved(x.get("t"), *when)
            # each exchange once: as its initiator recorded it (the responder's record is the same exchange)
            if peer and t is not None and x.get("role") == "initiated" and x.get("result") == "ok":
                self.edges.append((peer, t))

    def unshown(self, error: str) -> dict[str, Any]:
        """The row of a node whose ``row`` failed: every field the page reads, none of what the node said."""
        fields = ("task", "accuracy", "loss", "age", "peers", "exchanges_ok", "exchanges_answered", "upload_rate")
        return {"id": self.id, "url": self.url, "reachable": False, "error": error, **dict.fromkeys(fields),
                "seen_s_ago": None, "series": []}  # fmt: skip

    def row(self, now: float) -> dict[str, Any]:
        """The node as ``GET /api/network`` lists it."""
        s = self.status
        metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
        exchanges = s.get("exchanges") if isinstance(s.get("exchanges"), dict) else {}
        upload = s.get("upload") if isinstance(s.get("upload"), dict) else {}
        peers = s.get("peers")
        return {
            "id": self.id,
            "url": self.url,
            "reachable": self.reachable,
            "error": self.error,
            "task": text(s.get("task"), 100),
            "accuracy": number(metrics.get("accuracy")),
            "loss": number(metrics.get("loss")),
            "age": count(s.get("age")),
            "peers": len(peers) if isinstance(peers, list) else None,
            "exchanges_ok": count(exchanges.get("ok")),
            "exchanges_answered": count(exchanges.get("served")),
            "upload_rate": number(upload.get("rate_bytes_per_s")),
            "seen_s_ago": None if self.last_ok is None else round(now - self.last_ok, 3),
            "series": [[r["t"], r["accuracy"]] for r in self.series.after(0)],
        }

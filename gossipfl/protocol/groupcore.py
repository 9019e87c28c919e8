"""What both roles of a secure group round share: the node's exchange core (model, peers, membership,
merge flag), the one round a node takes part in at a time, applying a round's mean, counters, and the
options that secure groups need or cannot work with.

A node takes part in one round at a time, as initiator or member: it holds the merge flag of its
``GossipCore`` from the moment it joins a round (the initiator: before inviting; a member: before answering
the invite) until the round is decided, so no other round's mean lands between its snapshot and this round's.
A member gives up waiting (and releases the flag) only while its masked vector has not gone out (``hold_s``
after the invite), or ``give_up_s`` after it went out, by when the initiator has stopped sending the commit.
Local training goes on meanwhile; the mean is applied as a pairwise merge is, keeping the steps made since the
snapshot (``model = mean + (current - sent)``, ``GossipCore._apply``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gossipfl.protocol import groupwire, merge
from gossipfl.protocol.core import GossipCore
from gossipfl.protocol.ports import Snapshot
from gossipfl.protocol.transport import timeout_for
from gossipfl.security import masking
from gossipfl.security.keybinding import KeyBinder

# why a node refuses pairwise exchanges (409): its model would travel in the clear to one partner
GROUP_ONLY = "secure group: this node averages only in secure groups (--secure-group), never pairwise"
HOLD_FACTOR = 3.0  # a member waits this many request timeouts after the invite for the keys
GIVE_UP_S = 60.0  # a member that sent its masked vector waits this long for the decision (then: aborted)
GIVE_UP_FACTOR = 10.0  # ...or this many request timeouts, if longer (a large model)


def check_options(c: Any) -> None:
    """ValueError, naming the conflict, for node options that secure group averaging cannot work with
    (``c``: a NodeConfig)."""
    k = c.secure_group
    if k == 0:
        return
    if not masking.MIN_MEMBERS <= k <= masking.MAX_MEMBERS:
        raise ValueError(
            f"secure-group {k}: a group needs {masking.MIN_MEMBERS} to {masking.MAX_MEMBERS} members (with 2, the "
            "mean and one's own model give away the other's); 0 exchanges pairwise"
        )
    if not (c.secret_file or c.tls_cert):
        raise ValueError("secure-group needs --secret-file or mutual TLS: the round's keys must come from members")
    if not (c.read_token or c.read_token_file):
        raise ValueError("secure-group needs --read-token-file: else whoever reaches a node reads its model")
    if c.merge != "average":
        raise ValueError(f"secure-group with merge {c.merge}: a group round computes the plain mean; use average")
    if c.clip_radius is not None:
        raise ValueError("secure-group with clip-radius: masked models cannot be clipped; choose one")
    if c.compress != "none" or c.max_upload_rate is not None:
        raise ValueError(
            "secure-group with compress or max-upload-rate: group rounds send masked fixed-point vectors, which "
            "neither compress nor count against the upload budget"
        )


@dataclass
class GroupStats:
    """Counts of one node's secure group rounds, both roles, as ``/v1/status`` (``group``) and ``/metrics``
    report them."""

    size: int  # K: members of the rounds this node starts
    committed: int = 0  # rounds this node started that committed
    aborted: int = 0  # rounds this node started that aborted (reasons: ``aborts``)
    joined: int = 0  # rounds started by peers that this node committed as a member
    left: int = 0  # rounds started by peers that aborted at this node (after it accepted the invite)
    aborts: Counter = field(default_factory=Counter)  # reason -> rounds aborted, either role
    rejected: int = 0  # group messages refused as invalid (4xx)
    out_of_range: int = 0  # rounds this node refused: a coordinate of its model outside [-RANGE, RANGE]
    undelivered: int = 0  # committed rounds whose commit a member never took (a dropout after its vector)
    bytes_sent: int = 0
    bytes_received: int = 0
    last: dict | None = None  # the last round this node started: outcome, reason, members, seconds, bytes
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=100), repr=False)

    def ended(self, outcome: str, reason: str, members: int, seconds: float, nbytes: int) -> None:
        """Count a round this node started."""
        if outcome == "committed":
            self.committed += 1
            self.durations.append(seconds)
        else:
            self.aborted += 1
            self.aborts[reason] += 1
        last = {"outcome": outcome, "reason": reason or None, "members": members}
        self.last = {**last, "seconds": round(seconds, 4), "bytes": nbytes}

    def as_dict(self) -> dict[str, Any]:
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        out = {k: v for k, v in self.__dict__.items() if k not in ("durations", "aborts")}
        return {**out, "aborts": dict(self.aborts), "mean_duration_s": mean}


class GroupBase:
    """State both roles share (see the module's docstring)."""

    def __init__(self, *, core: GossipCore, size: int) -> None:
        self.core = core
        self.spec = core.spec
        self.n = groupwire.size_of(core.spec)
        self.max_body = groupwire.max_size(self.n)
        self.request_timeout = timeout_for(self.max_body)
        self.hold_s = HOLD_FACTOR * self.request_timeout
        self.give_up_s = max(GIVE_UP_S, GIVE_UP_FACTOR * self.request_timeout)
        self.stats = GroupStats(size)
        self.round_id: str | None = None  # the round this node holds the merge flag for
        self.binder: KeyBinder | None = None  # under mutual TLS: signs this node's keys, checks the others'
        self._background: set[asyncio.Task] = set()
        self._warned_range = False

    def check_start(self) -> None:
        """At start (ValueError, one line, when this node cannot take part in any round): the model must fit
        the fixed point, and under mutual TLS the node's certificate must be able to bind its keys."""
        tls = self.core.membership.tls
        if tls is not None:
            self.binder = KeyBinder.load(tls, self.core.node_id)
        try:
            self._encode(self.core.learner.snapshot())
        except masking.OutOfRange as e:
            raise ValueError(f"secure-group: the model does not fit the fixed point: {e}") from None

    def _out_of_range(self, e: masking.OutOfRange, role: str) -> None:
        """Count a round refused because this node's model does not fit; say so once above debug."""
        self.stats.out_of_range += 1
        if not self._warned_range:
            self._warned_range = True
            self.core.log.warning(
                "secure group: this node's model does not fit the fixed point (a coordinate beyond +-%g or not "
                "finite): it takes part in no round until it does (counted as out_of_range)",
                masking.RANGE,
            )
        self.core.log.debug("secure group round refused (%s): %s", role, e)  # (the detail: a value of the model)

    @property
    def closed(self) -> bool:
        return self.core.closed

    @property
    def tasks(self) -> list[asyncio.Task]:
        return list(self._background)

    async def _acquire(self, round_id: str) -> bool:
        """Hold the merge flag for ``round_id``; False, holding nothing, when a round or a merge holds it now."""
        if self.round_id is not None or not await self.core.pause_merges(patience=0.0):
            return False
        self.round_id = round_id
        return True

    def _release(self, round_id: str) -> None:
        if self.round_id == round_id:
            self.round_id = None
            self.core.resume_merges()

    def _encode(self, state: Snapshot) -> np.ndarray:
        """This node's model in fixed point (masking.OutOfRange when a coordinate does not fit)."""
        return masking.encode(groupwire.flatten(state.params, self.spec))

    async def _apply_mean(self, sent: Snapshot, total: np.ndarray, count: int, age: int) -> None:
        """Set the model to the round's mean, keeping what changed since ``sent`` (the caller holds the flag)."""

        def merged() -> merge.Merged:
            params = groupwire.unflatten(masking.decode_mean(total, count), self.spec)
            return merge.Merged(params, age, sent.weight)

        await self.core._apply(sent, await asyncio.to_thread(merged))  # the pairwise exchange's own rule

    def _in_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        self.core._report(task)


def mean_in_range(total: np.ndarray, count: int) -> bool:
    """Whether the mean a sum stands for fits [-RANGE, RANGE] (a sum of honest members' vectors always does)."""
    return bool(np.all(np.abs(masking.decode_mean(total, count)) <= masking.RANGE))


def elapsed(start: float) -> float:
    return time.perf_counter() - start

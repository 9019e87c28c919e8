"""What both sides of an exchange share: the node's codec settings, the merge of two states and its
application to the model, the one-merge-at-a-time flag, the freeze after a doubt, counters, and the
background tasks an exchange leaves behind. ``Initiator`` and ``Responder`` build on this; ``Gossiper``
is both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gossipfl.protocol import merge, wire
from gossipfl.protocol.ledger import DoubtBook
from gossipfl.protocol.ports import ModelStore, PeerBook, Snapshot
from gossipfl.protocol.robust import RobustMerge
from gossipfl.protocol.stats import ExchangeStats
from gossipfl.protocol.transport import timeout_for
from gossipfl.security.membership import Membership

FREEZE_S = 3.0  # after an exchange went in doubt, this node merges nothing else for this long


class GossipCore:
    def __init__(
        self,
        *,
        node_id: str,
        task: str,
        learner: ModelStore,
        peers: PeerBook,
        rule: str = "average",
        cluster: str = "default",
        log: logging.LoggerAdapter,
        port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        membership: Membership | None = None,
        robust: RobustMerge | None = None,
    ) -> None:
        self.node_id = node_id
        # who may exchange with this node, and how it proves its own membership (open when None)
        self.membership = membership or Membership(node_id)
        # self-centred clipping of what peers send (None: merge as received)
        self.robust = robust
        self.task = task
        self.learner = learner
        self.rule_name = rule
        self.cluster = cluster
        self.rule = merge.get_rule(rule)
        self.peers = peers
        self.log = log
        self.clock = clock
        self.port = port
        self.spec = wire.spec_of(learner.snapshot().params)
        self.max_body = wire.max_message_size(self.spec)
        self.model_digest = wire.spec_digest(self.spec)
        self.request_timeout = timeout_for(self.max_body)
        self.doubts: DoubtBook[Snapshot, merge.Merged] = DoubtBook()
        self.stats = ExchangeStats()
        # called with an exception that escaped an exchange task (a bug: the supervisor counts it)
        self.on_error: Callable[[BaseException], None] | None = None
        self._merging = False  # a merge is being decided or applied (either side); see gossiper.py
        self.freeze_s = FREEZE_S
        self._background: set[asyncio.Task] = set()  # best-effort aborts; merges committed as responder
        self._closed = False
        # why this node neither starts nor accepts exchanges for now (joining: fetching a model first), or None
        self.holding: str | None = None

    def close(self) -> None:
        """Refuse new exchanges from now on (the node is stopping); decisions on prepared ones still run."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    async def pause_merges(self, patience: float = 1.0) -> bool:
        """Hold the merge flag, so that no merge is decided or applied until ``resume_merges`` (exchanges that
        would merge meanwhile abort, as with any other merge in progress): for copying the model and the
        ledger at one moment (a checkpoint), or replacing the model (joining). False, holding nothing, if
        merges kept the flag for ``patience`` seconds."""
        deadline = self.clock() + patience
        while self._merging:
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.005)
        self._merging = True  # no await between the check and this
        return True

    def resume_merges(self) -> None:
        self._merging = False

    def frozen(self) -> bool:
        """An exchange went in doubt less than FREEZE_S ago: merge nothing else yet."""
        return self.doubts.fresh(self.clock(), self.freeze_s)

    def encode_state(self, state: Snapshot, xid: str | None = None) -> bytes:
        msg = wire.GossipMessage(
            self.node_id,
            state.age,
            state.params,
            self.task,
            self.rule_name,
            self.learner.train_size,
            state.weight,
            self.cluster,
            self.port,
            xid,
        )
        return wire.encode(msg)

    def _decode(self, body: bytes) -> wire.GossipMessage:
        """Decode and check that the message can be merged with this node's rule."""
        msg = wire.decode(body, self.spec, self.task)
        if msg.cluster is not None and msg.cluster != self.cluster:
            raise wire.WireError(f"cluster {msg.cluster!r} does not match this node's {self.cluster!r}")
        if msg.merge is not None and msg.merge != self.rule_name:
            raise wire.WireError(f"merge rule {msg.merge!r} does not match this node's {self.rule_name!r}")
        needed = {"samples": "samples", "pushsum": "weight"}.get(self.rule_name)
        if needed and getattr(msg, needed) is None:
            raise wire.WireError(f"merge rule {self.rule_name!r} needs field {needed!r}")
        if msg.xid is None:
            raise wire.WireError("field 'xid' is required in an exchange")
        return msg

    def _merge(self, mine: Snapshot, theirs: wire.GossipMessage) -> merge.Merged:
        """The merge of ``theirs`` into ``mine``, clipped first when the node merges robustly (raises
        robust.TooFar, a WireError, for a model implausibly far)."""
        params = theirs.params
        if self.robust is not None:
            params = self.robust.apply(mine.params, theirs.params, theirs.sender).params
        local = merge.Side(mine.params, mine.age, self.learner.train_size, mine.weight)
        remote = merge.Side(params, theirs.age, theirs.samples or 0, theirs.weight or 1.0)
        return self.rule(local, remote)

    def _snapshot_and_merge(self, theirs: wire.GossipMessage) -> tuple[Snapshot, merge.Merged]:
        state = self.learner.snapshot()
        return state, self._merge(state, theirs)

    async def _apply(self, sent: Snapshot, merged: merge.Merged) -> None:
        """Set the learner to ``merged``, keeping what changed since ``sent`` (local steps; and other merges,
        for a merge applied late). The caller holds ``_merging``."""

        def fn(now: Snapshot) -> tuple[dict, int, float]:
            params = merge.apply(now.params, sent.params, merged.params, changed=now.version != sent.version)
            weight = merge.apply_weight(now.weight, sent.weight, merged.weight)
            if now.merges != sent.merges:  # applied late, on top of other merges
                params = merge.keep_convex(params, now.params, merged.params, self.learner.statistics)
                params = merge.keep_nonnegative(params, now.params, sent.params, merged.params)
                weight = merge.keep_positive_weight(weight, now.weight, merged.weight)
            return params, max(now.age, merged.age), weight

        await asyncio.to_thread(self.learner.update, fn)

    def _background_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        self._report(task)

    def _report(self, task: asyncio.Task) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None and self.on_error is not None:
            self.on_error(exc)

"""What both sides of an exchange share: the node's codec settings, the merge of two states and its
application to the model, the one-merge-at-a-time flag, the freeze after a doubt, counters, and the
background tasks an exchange leaves behind. ``Initiator`` and ``Responder`` build on this; ``Gossiper``
is both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gossipfl.common.chunks import Chunks
from gossipfl.protocol import compress, merge, wire
from gossipfl.protocol.budget import UploadBudget
from gossipfl.protocol.consensus import relative_distance
from gossipfl.protocol.ledger import DoubtBook
from gossipfl.protocol.ports import ModelStore, PeerBook, Snapshot
from gossipfl.protocol.robust import RobustMerge
from gossipfl.protocol.stats import ExchangeStats
from gossipfl.protocol.transport import timeout_for
from gossipfl.security.membership import Membership

FREEZE_S = 3.0  # after an exchange went in doubt, this node merges nothing else for this long


@dataclass(frozen=True)
class Sent:
    """One side of an exchange as both partners merge it: the snapshot's counters, and its tensors as the
    partner decodes them (``exact``: the snapshot's own values; a lossy codec: what it decodes to; top-k:
    the values at ``index``, per tensor). Has a Snapshot's attributes, so the merge code takes either."""

    params: wire.Params
    age: int
    version: int
    weight: float
    merges: int
    body: Chunks
    exact: bool = True
    index: Mapping[str, np.ndarray | None] | None = None


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
        codec: compress.Codec = wire.NONE,
        upload: UploadBudget | None = None,
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
        initial = learner.snapshot().params
        self.spec = wire.spec_of(initial)
        # how this node compresses the exchanges it starts (the responder answers in the initiator's codec)
        self.codec = codec
        # what this node sends in exchanges, measured, and held to --max-upload-rate when it is set
        self.upload = upload or UploadBudget(None, clock)
        # top-k: per tensor, the values each coordinate had when it was last exchanged (error feedback: what
        # moved since and was not sent yet stays in ``model - reference`` until it is among the largest)
        self.reference: dict[str, np.ndarray] | None = None
        if isinstance(codec, compress.TopK):
            if any(a.size > compress.MAX_TENSOR_VALUES for a in initial.values()):
                raise ValueError("top-k compression indexes tensors of at most 2**32 - 1 values")
            self.reference = {name: np.array(a) for name, a in initial.items()}
            self._select_rng = np.random.default_rng(list(node_id.encode()))
        del initial
        self.max_body = wire.max_message_size(self.spec)
        self.model_digest = wire.spec_digest(self.spec)
        self.request_timeout = timeout_for(self.max_body)
        self.doubts: DoubtBook[Sent, merge.Merged] = DoubtBook()
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

    def _message(self, state: Snapshot, params: wire.Params, xid: str | None, index: Any = None) -> wire.GossipMessage:
        return wire.GossipMessage(
            self.node_id, state.age, params, self.task, self.rule_name, self.learner.train_size, state.weight,
            self.cluster, self.port, xid, index=index,
        )  # fmt: skip

    def encode_state(self, state: Snapshot, xid: str | None = None) -> Chunks:
        """The state as an uncompressed message (GET /v1/model, joining)."""
        return wire.encode(self._message(state, state.params, xid))

    def outgoing(
        self, state: Snapshot, xid: str, codec: compress.Codec, at: Mapping[str, np.ndarray] | None = None
    ) -> Sent:
        """The message this node sends in exchange ``xid`` for ``state`` (an initiator's with ``codec``; a
        responder's in the initiator's codec, or at the initiator's top-k indices ``at``), and the state as
        the partner decodes it. Raises WireError when the state cannot be sent (not finite)."""
        counters = (state.age, state.version, state.weight, state.merges)
        exact = self.learner.statistics  # (the convex statistics go whole and uncompressed: see docs)
        if at is None and isinstance(codec, compress.TopK):
            assert self.reference is not None, "top-k needs the reference of the last exchanged values"
            at = {
                name: None
                if name in exact
                else codec.select(np.asarray(a).reshape(-1) - self.reference[name].reshape(-1), self._select_rng)
                for name, a in state.params.items()
            }
            reply = False
        else:
            reply = at is not None
        if at is not None:
            values = {
                name: np.asarray(a) if at.get(name) is None else np.asarray(a).reshape(-1)[at[name]]
                for name, a in state.params.items()
            }
            msg = self._message(state, values, xid, at)
            body = wire.encode(msg, send_index=not reply, spec=self.spec, exact=exact)
            return Sent(values, *counters, body, exact=False, index=at)
        body = wire.encode(self._message(state, state.params, xid), codec, exact=exact)
        if codec.lossless:
            return Sent(state.params, *counters, body)
        # exactly what the partner will decode
        decoded = wire.decode(body.tobytes(), self.spec, reply=True, exact=exact)
        return Sent(decoded.params, *counters, body, exact=False)

    def _decode(
        self, body: bytes | bytearray, at: Mapping[str, np.ndarray] | None = None, reply: bool = False
    ) -> wire.GossipMessage:
        """Decode and check that the message can be merged with this node's rule (``at``, ``reply``: see
        wire.decode)."""
        msg = wire.decode(body, self.spec, self.task, at=at, reply=reply, exact=self.learner.statistics)
        if msg.cluster is not None and msg.cluster != self.cluster:
            raise wire.WireError(f"cluster {msg.cluster!r} does not match this node's {self.cluster!r}")
        if msg.merge is not None and msg.merge != self.rule_name:
            raise wire.WireError(f"merge rule {msg.merge!r} does not match this node's {self.rule_name!r}")
        needed = {"samples": "samples", "pushsum": "weight"}.get(self.rule_name)
        if needed and getattr(msg, needed) is None:
            raise wire.WireError(f"merge rule {self.rule_name!r} needs field {needed!r}")
        if msg.xid is None:
            raise wire.WireError("field 'xid' is required in an exchange")
        if msg.compress != "none" and self.rule_name == "pushsum":
            raise wire.WireError(f"compression {msg.compress!r} cannot be merged with push-sum (see --compress)")
        if msg.index is not None and self.robust is not None:
            raise wire.WireError("this node merges robustly (--clip-radius) and takes no top-k exchanges")
        return msg

    def _merge(self, mine: Snapshot, theirs: wire.GossipMessage) -> merge.Merged:
        """The merge of ``theirs`` into ``mine`` (both as sent: whole tensors, or the values at the same top-k
        indices), clipped first when the node merges robustly (raises robust.TooFar, a WireError, for a model
        implausibly far). The result is written into the arrays of ``theirs`` (decoded from the body this node
        read: no other copy of the model is made)."""
        params = theirs.params
        distance = relative_distance(mine.params, theirs.params)  # before the merge overwrites theirs
        if self.robust is not None:
            params = self.robust.apply(mine.params, theirs.params, theirs.sender).params
        local = merge.Side(mine.params, mine.age, self.learner.train_size, mine.weight)
        remote = merge.Side(params, theirs.age, theirs.samples or 0, theirs.weight or 1.0)
        into = {n: a for n, a in params.items() if isinstance(a, np.ndarray) and a.flags.writeable}
        return replace(self.rule(local, remote, into=into), distance=distance)

    async def _apply(self, sent: Snapshot, merged: merge.Merged) -> None:
        """Set the learner to ``merged``, keeping what changed since ``sent`` (local steps; and other merges,
        for a merge applied late; and, with a lossy codec, what the codec lost of this node's model). With
        top-k, only the coordinates exchanged change. The caller holds ``_merging``."""
        index: Mapping[str, np.ndarray | None] = getattr(sent, "index", None) or {}
        exact = getattr(sent, "exact", True)

        def fn(now: Snapshot) -> tuple[dict, int, float]:
            # the exchanged part of each tensor: all of it, or the values at its top-k indices
            current = {n: a if index.get(n) is None else a.reshape(-1)[index[n]] for n, a in now.params.items()}
            late = now.merges != sent.merges
            if self.reference is not None:  # top-k's reference: the exchanged coordinates' merged values
                for name, i in index.items():
                    if i is not None:
                        self.reference[name].reshape(-1)[i] = merged.params[name]
            if not late and (now.version != sent.version or not exact):  # current + (merged - sent), in place
                params = merge.rebase_into(current, sent.params, merged.params)
            else:
                params = merge.apply(current, sent.params, merged.params, changed=late)
            weight = merge.apply_weight(now.weight, sent.weight, merged.weight)
            if late:  # applied late, on top of other merges
                params = merge.keep_convex(params, current, merged.params, self.learner.statistics)
                params = merge.keep_nonnegative(params, current, sent.params, merged.params)
                weight = merge.keep_positive_weight(weight, now.weight, merged.weight)
            for name, i in index.items():  # top-k: only the exchanged coordinates change
                if i is not None:
                    np.put(now.params[name], i, params[name])  # (flat indices, whatever the layout)
                    params[name] = now.params[name]
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

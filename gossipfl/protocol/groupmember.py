"""A member's side of a secure group round (the initiator's is groupround.py):

1. *invite*: hold the merge flag for the round (409 when this node is in another round), snapshot the model,
   encode it in fixed point (409, counted, when a coordinate is out of range: the reply says no more), make a
   key pair for this round alone, answer with its public key (under mutual TLS, signed: ``proof``). A round
   whose keys have not come ``hold_s`` after the invite is aborted here.
2. *mask*: given every member's public key (under mutual TLS, each with its proof, checked: an initiator can
   neither invent a member nor substitute a key), derive a mask seed with each other member, answer with the
   masked model, and forget the secret key. From now on the initiator may commit: this node keeps the merge
   flag and waits for its decision, for up to ``give_up_s`` (then the round is aborted here); meanwhile it
   refuses every other round (409), so a commit always lands on the snapshot it was computed from.
3. *commit* (the sum of the masked vectors) or *abort*: decided by the initiator alone; a commit is applied
   once, rebased on the local steps made since the snapshot.

Any message that is not what the round expects (another round id, a sender that is not the initiator, a key
that is not a valid point or not bound to its member, a vector of the wrong length or type) is refused, and the
round is aborted here with the model unchanged. A request that fails authentication (401) never reaches the
round: an outsider cannot cancel it."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gossipfl.protocol import groupwire, wire
from gossipfl.protocol.groupcore import GroupBase, mean_in_range
from gossipfl.protocol.ledger import ABORTED, COMMITTED
from gossipfl.protocol.merge import MAX_AGE_GAIN
from gossipfl.protocol.ports import Snapshot
from gossipfl.protocol.responder import Busy, Conflict, Impersonation
from gossipfl.security import masking
from gossipfl.security.keybinding import Unbound

INVITED, MASKED = "invited", "masked"
OUT_OF_RANGE = "this node's model cannot take part in a secure group round now"  # (no detail: it is the model's)
REMEMBER = 4096  # outcomes of rounds remembered (a late or repeated message gets the same answer)


@dataclass
class MemberRound:
    round: str
    initiator: str
    members: tuple[str, ...]
    position: int
    sent: Snapshot
    public: bytes
    key: X25519PrivateKey | None  # forgotten once the masked vector is made
    encoded: np.ndarray | None  # this node's model in fixed point, until masked
    state: str = INVITED
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class GroupMember(GroupBase):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: dict[str, MemberRound] = {}
        self.outcomes: OrderedDict[str, str] = OrderedDict()
        self.applying = 0  # committed rounds whose mean is being applied

    # -- phases ------------------------------------------------------------------------------------------
    def hello(self, body: bytes, member: str | None, remote: str | None) -> None:
        """``POST /v1/group/hello``: a member that knows too few peers says where it listens. Raises WireError
        (400), Impersonation (401)."""
        sender, port = self._checked(lambda: groupwire.decode_hello(body))
        if member is not None and sender != member:
            self.stats.rejected += 1
            raise Impersonation(f"hello from {sender!r} sent by member {member!r}")
        self._learn(sender, port, remote)

    def _learn(self, sender: str, port: int | None, remote: str | None) -> None:
        """Identify a caller this node does not know (at the address the call came from), as a pairwise
        exchange's responder does."""
        on_inbound = getattr(self.core, "on_inbound", None)
        if remote and port and on_inbound is not None:
            host = f"[{remote}]" if ":" in remote else remote
            url, known = f"{self.core.membership.scheme}://{host}:{port}", self.core.peers.get(sender)
            if known is None or known.url != url:
                on_inbound(sender, url)

    async def invite(self, body: bytes, member: str | None, remote: str | None = None) -> bytes:
        """Phase 1 (``POST /v1/group``). Raises WireError (400), Impersonation (401), Busy or Conflict (409)."""
        core = self.core
        msg = self._checked(lambda: groupwire.decode_invite(body))
        if member is not None and msg.sender != member:
            self.stats.rejected += 1
            raise Impersonation(f"invite from {msg.sender!r} sent by member {member!r}")
        self._learn(msg.sender, msg.port, remote)
        problem = _mismatch(msg, core.cluster, core.task, core.model_digest, self.n)
        if core.node_id not in msg.members[1:]:
            problem = problem or "this node is not among the invited members"
        if problem:
            self.stats.rejected += 1
            raise wire.WireError(problem)
        if self.closed:
            raise Busy("stopping")
        if msg.round in self.rounds or msg.round in self.outcomes:
            raise Conflict(f"round {msg.round} is already known here")
        if not await self._acquire(msg.round):
            raise Busy("busy: in another round")
        try:
            sent = await asyncio.to_thread(core.learner.snapshot)
            encoded = await asyncio.to_thread(self._encode, sent)
        except masking.OutOfRange as e:  # (the reply must not carry the coordinate: a value of the model)
            self._release(msg.round)
            self.stats.aborts["out_of_range"] += 1
            self._out_of_range(e, f"member of {msg.round} from {msg.sender}")
            raise Busy(OUT_OF_RANGE) from None
        except BaseException:
            self._release(msg.round)
            raise
        if msg.round in self.outcomes:  # aborted while the snapshot was being taken
            self._release(msg.round)
            raise Conflict(f"round {msg.round} was aborted")
        key = masking.new_key()
        entry = MemberRound(
            msg.round, msg.sender, msg.members, msg.members.index(core.node_id), sent, masking.public_bytes(key),
            key, encoded,
        )  # fmt: skip
        self.rounds[msg.round] = entry
        entry.timers.append(asyncio.get_running_loop().call_later(self.hold_s, self._hold_over, msg.round))
        proof = None if self.binder is None else self.binder.sign(msg.round, msg.members, entry.public)
        reply = groupwire.encode_joined(groupwire.Joined(msg.round, core.node_id, entry.public, sent.age, proof))
        self.stats.bytes_received += len(body)
        self.stats.bytes_sent += len(reply)
        return reply

    async def mask(self, round_id: str, body: bytes, member: str | None) -> bytes:
        """Phase 2 (``POST /v1/group/{round}/mask``): every member's key in, this node's masked model out."""
        entry = self._entry(round_id, member)
        if entry.state != INVITED:
            raise Conflict(f"round {round_id}: the keys came already")
        msg = self._checked(lambda: groupwire.decode_keys(body, round_id, entry.members), entry)
        if msg.sender != entry.initiator:
            self._refuse(entry, f"keys sent as {msg.sender!r}, the round's initiator is {entry.initiator!r}")
        if msg.keys[entry.position] != entry.public:
            self._refuse(entry, "the keys do not hold the one this node gave for this round")
        if self.binder is not None:  # every other member's key must be signed by that member's certificate
            for j, member_id in enumerate(entry.members):
                if j != entry.position:
                    proof = msg.proofs[j] if msg.proofs is not None else None
                    try:
                        self.binder.verify(proof, round_id, entry.members, member_id, msg.keys[j])
                    except Unbound as e:
                        self._refuse(entry, f"member {j}'s key is not bound to it: {e}")
        assert entry.key is not None and entry.encoded is not None
        rid = bytes.fromhex(round_id)
        try:
            vector = await asyncio.to_thread(
                masking.masked_vector, entry.encoded, entry.key, msg.keys, rid, entry.members, entry.position
            )
        except ValueError as e:  # a key that is not a valid X25519 point (or gives an all-zero secret)
            self._refuse(entry, str(e))
        if self.rounds.get(round_id) is not entry:  # aborted meanwhile
            raise Conflict(f"round {round_id} was aborted")
        entry.state, entry.key, entry.encoded = MASKED, None, None
        for t in entry.timers:  # from now on the flag is held until the decision, give_up_s at most
            t.cancel()
        entry.timers = [asyncio.get_running_loop().call_later(self.give_up_s, self._give_up, round_id)]
        reply = groupwire.encode_vector(groupwire.Vector(round_id, self.core.node_id, vector))
        self.stats.bytes_received += len(body)
        self.stats.bytes_sent += len(reply)
        return reply

    async def commit(self, round_id: str, body: bytes, member: str | None) -> tuple[str, str]:
        """Phase 3 (``POST /v1/group/{round}/commit``): the sum of the masked vectors. (outcome, reason): the
        same to every later call; an unknown round is answered "aborted"."""
        if (outcome := self.outcomes.get(round_id)) is not None:
            return outcome, "already decided"
        if round_id not in self.rounds:
            return ABORTED, "unknown round (never joined here, expired or given up)"
        entry = self._entry(round_id, member)
        if entry.state != MASKED:
            self._refuse(entry, "a commit before this node sent its masked model", Conflict)
        msg = self._checked(lambda: groupwire.decode_commit(body, round_id, self.n), entry)
        if msg.sender != entry.initiator:
            self._refuse(entry, f"commit sent as {msg.sender!r}, the round's initiator is {entry.initiator!r}")
        if not mean_in_range(msg.data, len(entry.members)):
            self._refuse(entry, "the sum stands for a mean out of range: not the sum of this round's vectors")
        self._forget(entry, COMMITTED)
        self.applying += 1
        self.stats.joined += 1
        self.stats.bytes_received += len(body)
        age = min(msg.age or 0, entry.sent.age + MAX_AGE_GAIN)  # (an age is a claim: capped as in a pairwise merge)
        self._in_background(self._apply_committed(entry, msg.data, age))
        return COMMITTED, ""

    def abort(self, round_id: str, member: str | None) -> tuple[str, str]:
        """``POST /v1/group/{round}/abort``: the initiator gives the round up (an unknown round is remembered as
        aborted, so an invite that comes late is refused)."""
        if (outcome := self.outcomes.get(round_id)) is not None:
            return outcome, "already decided"
        entry = self.rounds.get(round_id)
        if entry is None:
            self._remember(round_id, ABORTED)
            return ABORTED, "unknown round"
        self._entry(round_id, member)  # only its initiator aborts it
        self._drop(entry, "initiator")
        return ABORTED, "aborted by the initiator"

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _entry(self, round_id: str, member: str | None) -> MemberRound:
        entry = self.rounds.get(round_id)
        if entry is None:
            outcome = self.outcomes.get(round_id)
            raise Conflict(
                f"round {round_id} was already {outcome}" if outcome else f"round {round_id} is unknown here"
            )
        if member is not None and member != entry.initiator:
            self.stats.rejected += 1
            raise Impersonation(f"round {round_id} belongs to another member")
        return entry

    def _checked(self, decode: Any, entry: MemberRound | None = None) -> Any:
        """``decode()``, counting and (for a round in progress) aborting on a WireError."""
        try:
            return decode()
        except wire.WireError as e:
            if entry is None:
                self.stats.rejected += 1
                raise
            self._refuse(entry, str(e))

    def _refuse(self, entry: MemberRound, why: str, kind: type[Exception] = wire.WireError) -> None:
        """Abort ``entry`` here for a message it cannot take; raise ``kind`` (400 or 409) saying why."""
        self.stats.rejected += 1
        if self._drop(entry, "invalid"):
            self.core.log.info("group round %s from %s aborted: %s", entry.round, entry.initiator, why)
        raise kind(why)

    def _drop(self, entry: MemberRound, reason: str) -> bool:
        """Abort ``entry`` here, counted once (False when it was decided already)."""
        if self.rounds.get(entry.round) is not entry:
            return False
        self._forget(entry, ABORTED)
        self.stats.left += 1
        self.stats.aborts[reason] += 1
        return True

    def _forget(self, entry: MemberRound, outcome: str) -> None:
        """The round is decided here: release what it holds (a commit releases once applied)."""
        self.rounds.pop(entry.round, None)
        for t in entry.timers:
            t.cancel()
        self._remember(entry.round, outcome)
        entry.key = entry.encoded = None
        if outcome != COMMITTED:
            self._release(entry.round)

    def _remember(self, round_id: str, outcome: str) -> None:
        self.outcomes[round_id] = outcome
        while len(self.outcomes) > REMEMBER:
            self.outcomes.popitem(last=False)

    def _hold_over(self, round_id: str) -> None:
        """No keys within hold_s of the invite: the round is aborted here."""
        entry = self.rounds.get(round_id)
        if entry is not None and entry.state == INVITED:
            self._drop(entry, "expired")
            self.core.log.info("group round %s from %s: no keys within %.1f s", round_id, entry.initiator, self.hold_s)

    def _give_up(self, round_id: str) -> None:
        """No decision within give_up_s of the masked vector: by now the initiator has stopped sending it."""
        if (entry := self.rounds.get(round_id)) is not None:
            self._drop(entry, "no_decision")
            self.core.log.warning("group round %s: no decision from %s, assumed aborted", round_id, entry.initiator)

    async def _apply_committed(self, entry: MemberRound, total: np.ndarray, age: int) -> None:
        try:  # (the round holds the flag until here: nothing else merged since the snapshot)
            await self._apply_mean(entry.sent, total, len(entry.members), age)
        finally:
            self.applying -= 1
            self._release(entry.round)
        self.core.log.debug("group round %s from %s committed", entry.round, entry.initiator)

    # -- stopping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """The node is stopping: rounds still waiting for their keys are aborted now (releasing the flag);
        rounds whose masked vector went out may still be decided while the node's other work winds down
        (``settle``), and what is left undecided then is aborted by ``abandon``."""
        for entry in list(self.rounds.values()):
            if entry.state == INVITED:
                self._drop(entry, "stopping")
        if self.rounds or self.applying:
            self._in_background(self._settle())

    async def _settle(self) -> None:
        while self.rounds or self.applying:
            await asyncio.sleep(0.02)

    def abandon(self) -> None:
        """Abort every round still undecided here, releasing the merge flag (before the last checkpoint)."""
        for entry in list(self.rounds.values()):
            self._drop(entry, "stopping")
        if self.round_id is not None:  # (every task of the node has ended: an apply cancelled before it ran)
            self.applying = 0
            self._release(self.round_id)


def _mismatch(msg: groupwire.Invite, cluster: str, task: str, model: str, n: int) -> str:
    """Why this node cannot join the invited round ("" if it can)."""
    if msg.cluster != cluster:
        return f"cluster {msg.cluster!r} does not match this node's {cluster!r}"
    if msg.task != task:
        return f"task {msg.task!r} does not match this node's {task!r}"
    if msg.model != model or msg.n != n:
        return f"model {msg.model} of {msg.n} coordinates, this node's is {model} of {n}"
    return ""

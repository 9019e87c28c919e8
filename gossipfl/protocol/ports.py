"""What the exchange needs from the rest of a node, as small structural interfaces: a model it can
snapshot and update (the Learner), and a book of peers it can choose from and report on (the PeerTable).
The protocol layer imports neither; anything with these attributes will do (tests use fakes)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

Params = Mapping[str, np.ndarray]


class Snapshot(Protocol):
    """A consistent copy of a model's gossiped state."""

    @property
    def params(self) -> Params: ...
    @property
    def age(self) -> int: ...  # training steps the model embodies
    @property
    def version(self) -> int: ...  # bumped by every change (a train step or a merge)
    @property
    def weight(self) -> float: ...  # push-sum weight
    @property
    def merges(self) -> int: ...  # bumped by every merge


class ModelStore(Protocol):
    """A model the exchange reads and merges into (``learning.learner.Learner``)."""

    @property
    def train_size(self) -> int: ...  # local samples (the ``samples`` merge rule's weight)
    @property
    def merges(self) -> int: ...
    @property
    def statistics(self) -> frozenset[str]: ...  # state that must stay a convex mix (merge.keep_convex)

    def snapshot(self) -> Snapshot: ...

    def update(self, fn: Callable[[Snapshot], tuple[dict[str, np.ndarray], int, float]]) -> object:
        """Replace the state with ``fn(current)`` -> (params, age, weight), atomically."""
        ...


class PeerRef(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...


class PeerBook(Protocol):
    """The peers an initiator chooses from and reports on (``discovery.peers.PeerTable``)."""

    def choose(self, rng: random.Random, exclude: set[str] | frozenset[str] = ...) -> PeerRef | None: ...
    def get(self, peer_id: str) -> PeerRef | None: ...
    def mark_ok(self, peer_id: str) -> None: ...
    def mark_busy(self, peer_id: str) -> None: ...
    def mark_failed(self, peer_id: str) -> None: ...
    def ignore(self, peer_id: str, url: str | None, reason: str, for_s: float | None = None) -> bool: ...

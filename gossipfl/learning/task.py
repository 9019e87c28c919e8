"""The task plug-in: what a node learns, on which data, with which model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import nn


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"dataset has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class TaskData:
    train: Dataset
    test: Dataset
    num_classes: int


class Task(Protocol):
    """A classification task. ``load_data`` must be deterministic given ``data_seed`` so that every node
    of a cluster agrees on the train/test split; ``build_model`` is seeded by the caller."""

    name: str

    def load_data(self, data_seed: int) -> TaskData: ...

    def build_model(self) -> nn.Module: ...

"""The task plug-in: what a node learns, on which data, with which model.

A task is any object with these members (see ``examples/my_task.py`` for a complete one):

- ``name: str`` — nodes only gossip with peers of the same task name;
- ``input_spec: InputSpec`` — one sample's raw input (shape without the batch axis, dtype), as the
  task's data provides it; any normalisation belongs inside the model;
- ``load_data(data_seed) -> TaskData`` — deterministic in ``data_seed``, so that every node of a
  cluster agrees on the train/test split (a node then keeps only its partition of ``train``);
- ``build_model() -> torch.nn.Module`` — the caller seeds torch first, so nodes started with
  different ``--seed`` start from different parameters;
- ``train_step(model, optimizer, x, y) -> float`` — one minibatch step, returns the loss;
- ``evaluate(model, x, y) -> Evaluation`` — on the test split, in eval mode, without gradients;
- optional, for inference clients: ``output_specs(num_classes) -> list[OutputSpec]`` and
  ``predict(model, x) -> dict[str, Tensor]`` (one entry per output spec). Without them a node serves
  the model's raw output as one FP32 tensor named ``output``.

``ClassificationTask`` implements the last four (cross-entropy, accuracy, class probabilities and the
predicted label); subclass it and write the first four.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from gossipfl.learning.splitting import split_indices


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


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]  # one sample, without the batch axis
    dtype: str  # numpy dtype name, e.g. "float32"
    name: str = "input"  # the tensor's name for inference clients


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # one sample, without the batch axis


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None = None


@runtime_checkable
class Task(Protocol):
    name: str
    input_spec: InputSpec

    def load_data(self, data_seed: int) -> TaskData: ...

    def build_model(self) -> nn.Module: ...

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> float: ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation: ...


class ClassificationTask:
    """Base for classification tasks: cross-entropy training and accuracy. Labels are int64 class ids."""

    name = "classification"
    input_spec = InputSpec((), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        logits = model(x)
        return Evaluation(
            loss=float(nn.functional.cross_entropy(logits, y)),
            accuracy=float((logits.argmax(dim=1) == y).float().mean()),
        )

    def output_specs(self, num_classes: int) -> list[OutputSpec]:
        return [OutputSpec("probabilities", "float32", (num_classes,)), OutputSpec("label", "int64", ())]

    def predict(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What inference clients get: class probabilities and the predicted label."""
        probs = torch.softmax(model(x).float(), dim=1)
        return {"probabilities": probs, "label": probs.argmax(dim=1)}


VALIDATION_FRACTION = 0.2


def with_validation(data: TaskData, data_seed: int, fraction: float = VALIDATION_FRACTION) -> TaskData:
    """The task's data with a seeded, stratified ``fraction`` of its training split held out as the
    evaluation set, in place of the test split (which is left out entirely). Every node computes the
    same hold-out before partitioning, so settings can be chosen on it without looking at the test
    split that scores the final claims."""
    train, val = split_indices(data.train.y, fraction, data_seed + 1)
    return TaskData(data.train.subset(train), data.train.subset(val), data.num_classes)


def split(x: np.ndarray, y: np.ndarray, data_seed: int, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """Seeded, stratified train/test split (every node computes the same one; see splitting.py)."""
    train, test = split_indices(y, test_fraction, data_seed)
    return Dataset(x[train], y[train]), Dataset(x[test], y[test])

"""Small tasks for tests: each one makes one behaviour easy to see."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gossipfl.learning.task import ClassificationTask, Dataset, Evaluation, InputSpec, TaskData


def blobs(n_train: int, n_test: int = 40, dim: int = 4, seed: int = 0) -> TaskData:
    """Two Gaussian blobs, easy to separate."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % 2
    x = (rng.normal(size=(n, dim)) + 2.0 * y[:, None]).astype(np.float32)
    return TaskData(Dataset(x[:n_train], y[:n_train].astype(np.int64)), Dataset(x[n_train:], y[n_train:]), 2)


class BatchNormTask(ClassificationTask):
    """An MLP with BatchNorm on ``n_train`` samples: with 65 and batches of 32, every epoch ends with a
    minibatch of one, which BatchNorm refuses in training mode (a ValueError, once per epoch)."""

    name = "batchnorm"
    input_spec = InputSpec((4,), "float32")

    def __init__(self, n_train: int = 65) -> None:
        self.n_train = n_train

    def load_data(self, data_seed: int) -> TaskData:
        return blobs(self.n_train, seed=data_seed)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


class BrokenTask(BatchNormTask):
    """Every training step raises: a loop that cannot go on."""

    name = "broken"

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        raise RuntimeError("this task's training step always fails")


class CountingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class CountingTask:
    """Each training step adds exactly 1 to every weight: the number of local steps a model embodies can
    be read off its weights, an oracle independent of the code under test."""

    name = "counting"
    input_spec = InputSpec((4,), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        return blobs(64)

    def build_model(self) -> nn.Module:
        return CountingModel()

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            model.w += 1.0
        return 0.0

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        return Evaluation(loss=0.0)


class SlowEvalTask(BatchNormTask):
    """Evaluation holds the learner's lock for ``seconds``."""

    name = "slow-eval"

    def __init__(self, seconds: float = 2.0) -> None:
        super().__init__(n_train=128)
        self.seconds = seconds

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        import time

        time.sleep(self.seconds)
        return super().evaluate(model, x, y)

"""A complete user task for gossipfl: Fisher's iris flowers (ships with scikit-learn, which this example
needs: ``pip install scikit-learn``), a small MLP.

Run a node with it (from the repository root, so that ``examples`` is importable):

    PYTHONPATH=examples gossipfl node --task iris_task:make_task --partition 0/3

Everything a task must provide is here; ``ClassificationTask`` supplies ``train_step`` (one
cross-entropy minibatch step) and ``evaluate`` (loss and accuracy on the test split). Override them for
another kind of model (see ``gossipfl/learning/task.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gossipfl import ClassificationTask, InputSpec, TaskData, split


class Standardize(nn.Module):
    """Fixed feature scaling inside the model, so the served model takes raw measurements (cm)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class IrisTask(ClassificationTask):
    # nodes only gossip with peers whose task has the same name (and the same model shape)
    name = "iris"
    # one sample's raw input, without the batch axis: 4 measurements in cm
    input_spec = InputSpec((4,), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        """Must be deterministic in data_seed: every node computes the same split, then keeps its shard."""
        from sklearn.datasets import load_iris

        x, y = load_iris(return_X_y=True)
        train, test = split(x.astype(np.float32), y.astype(np.int64), data_seed)
        return TaskData(train, test, num_classes=3)

    def build_model(self) -> nn.Module:
        """Called after torch is seeded with the node's --seed. Constants (not learned) may live in buffers:
        they are not gossiped, so they must be the same on every node, as here."""
        return nn.Sequential(
            Standardize([5.84, 3.06, 3.76, 1.20], [0.83, 0.44, 1.77, 0.76]),
            nn.Linear(4, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )


def make_task() -> IrisTask:
    """The factory named on the command line (``--task iris_task:make_task``)."""
    return IrisTask()

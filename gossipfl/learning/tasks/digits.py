"""Built-in tasks on scikit-learn's 8x8 handwritten digits (ships offline): ``digits`` (MLP 64-64-10)
and ``digits-cnn`` (a small CNN). Both take the raw 64 pixel values (0 to 16) and scale inside."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, split

PIXEL_MAX = 16.0


class Scale(nn.Module):
    """Normalises raw inputs inside the model, so a served model takes the data's raw features."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class DigitsTask(ClassificationTask):
    name = "digits"
    input_spec = InputSpec((64,), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        train, test = split(x.astype(np.float32), y.astype(np.int64), data_seed)
        return TaskData(train, test, num_classes=10)

    def build_model(self) -> nn.Module:
        return nn.Sequential(Scale(1.0 / PIXEL_MAX), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class DigitsCnnTask(DigitsTask):
    name = "digits-cnn"

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            Scale(1.0 / PIXEL_MAX),
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

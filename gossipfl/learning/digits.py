"""Built-in task ``digits``: scikit-learn's 8x8 handwritten digits (ships offline), a small MLP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .task import Dataset, TaskData

PIXEL_MAX = 16.0


class Scale(nn.Module):
    """Normalises raw inputs inside the model, so a served model takes the data's raw features."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class DigitsTask:
    name = "digits"
    test_fraction = 0.2

    def load_data(self, data_seed: int) -> TaskData:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x.astype(np.float32),
            y.astype(np.int64),
            test_size=self.test_fraction,
            random_state=data_seed,
            stratify=y,
        )
        return TaskData(Dataset(x_tr, y_tr), Dataset(x_te, y_te), num_classes=10)

    def build_model(self) -> nn.Module:
        return nn.Sequential(Scale(1.0 / PIXEL_MAX), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

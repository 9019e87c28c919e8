"""Built-in tasks on the 8x8 handwritten digits (UCI, as scikit-learn ships them; bundled in
``data/digits.npz``, see ``data/README.md``): ``digits`` (MLP 64-64-10) and ``digits-cnn`` (a small CNN).
Both take the raw 64 pixel values (0 to 16) and scale inside."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, split

PIXEL_MAX = 16.0


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (uint8, 1797 x 64, values 0..16) and labels (uint8), in scikit-learn's order."""
    with resources.files("gossipfl.learning.tasks").joinpath("data/digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as data:
            return data["x"], data["y"]


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
        x, y = load_digits()
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

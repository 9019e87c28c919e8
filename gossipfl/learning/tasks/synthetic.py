"""Built-in task ``synthetic``: multinomial logistic regression on a seeded generated problem of any size.

``--task synthetic:dim=512,classes=4,samples=4000`` (defaults: dim 20, classes 2, samples 2000). The
labels come from a random linear teacher plus Gumbel noise, so the Bayes-optimal model is linear."""

from __future__ import annotations

import numpy as np
from torch import nn

from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, split


class SyntheticTask(ClassificationTask):
    name = "synthetic"

    def __init__(self, dim: int = 20, classes: int = 2, samples: int = 2000, noise: float = 0.5) -> None:
        if dim < 1 or classes < 2 or samples < 10 * classes or noise < 0:
            raise ValueError("synthetic needs dim >= 1, classes >= 2, samples >= 10*classes, noise >= 0")
        self.dim, self.classes, self.samples, self.noise = dim, classes, samples, noise
        self.input_spec = InputSpec((dim,), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        rng = np.random.default_rng(data_seed)
        teacher = rng.normal(size=(self.dim, self.classes)) / np.sqrt(self.dim)
        x = rng.normal(size=(self.samples, self.dim)).astype(np.float32)
        logits = x @ teacher * 4.0 + self.noise * rng.gumbel(size=(self.samples, self.classes))
        y = logits.argmax(axis=1).astype(np.int64)
        train, test = split(x, y, data_seed)
        return TaskData(train, test, num_classes=self.classes)

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, self.classes)

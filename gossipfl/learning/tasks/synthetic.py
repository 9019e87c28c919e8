"""Built-in task ``synthetic``: multinomial logistic regression on a seeded generated problem of any size.

``--task synthetic:dim=512,classes=4,samples=4000`` (defaults: dim 20, classes 2, samples 2000). The
labels come from a random linear teacher plus Gumbel noise, so the Bayes-optimal model is linear.

``mb=N`` (for benchmarks of real model sizes) makes the model a multi-layer perceptron of about N MB of
float32 parameters (N * 2**20 bytes, within 1%) while the data stays as small as the other options say:
hidden layers of width up to 2,048 (16 MB each), so that no tensor is larger than a layer of a real model
and memory can be accounted tensor by tensor."""

from __future__ import annotations

import itertools

import numpy as np
from torch import nn

from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, split


class SyntheticTask(ClassificationTask):
    name = "synthetic"

    def __init__(self, dim: int = 20, classes: int = 2, samples: int = 2000, noise: float = 0.5, mb: float = 0) -> None:
        if dim < 1 or classes < 2 or samples < 10 * classes or noise < 0:
            raise ValueError("synthetic needs dim >= 1, classes >= 2, samples >= 10*classes, noise >= 0")
        if not 0 <= mb <= MAX_MB:
            raise ValueError(f"synthetic needs 0 <= mb <= {MAX_MB}")
        self.dim, self.classes, self.samples, self.noise = dim, classes, samples, noise
        self.hidden = hidden_layers(mb, dim, classes) if mb else ()
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
        if not self.hidden:
            return nn.Linear(self.dim, self.classes)
        widths = (self.dim, *self.hidden)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], self.classes))


MAX_MB = 65536  # 64 GiB of parameters: far beyond a machine's memory, a bound on what a typo can ask for
MAX_WIDTH = 2048


def hidden_layers(mb: float, dim: int, classes: int) -> tuple[int, ...]:
    """Widths of the hidden layers of an MLP ``dim -> hidden... -> classes`` with about ``mb`` MB of float32
    parameters: the fewest layers of one width (at most MAX_WIDTH) that reach the target."""
    target = mb * (1 << 20) / 4  # parameters
    layers = 1
    while True:
        # parameters of `layers` hidden layers of width w: w(dim+1) + (layers-1) w(w+1) + classes(w+1)
        a, b, c = layers - 1, dim + 1 + (layers - 1) + classes, classes - target
        width = -c / b if a == 0 else (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)
        if width <= MAX_WIDTH:
            return (max(1, round(width)),) * layers
        layers += 1

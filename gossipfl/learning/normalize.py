"""Input standardisation that the network agrees on.

Scaling is not a local decision in a network: nodes that standardise with their own statistics feed
differently scaled inputs to models that are then averaged. ``Standardize`` keeps the statistics in the
model, as two floating-point buffers: the per-column mean and the mean of squares of the training
inputs. A node fills them from its own shard before training (``fit_standardizers``); from then on they
travel with the model and every merge averages them like the parameters, so the network converges to
one set: the mean of the nodes' moments (under ``samples`` and ``pushsum``, weighted by their data),
which for moments is the pooled mean and mean of squares. The variance is taken from the two moments at
each forward pass, so averaging moments, not variances, is what makes it the pooled variance.

What the statistics reveal: a peer (and anyone who downloads the model) learns the per-column mean and
mean of squares of a node's shard, blended with its partners' after the first exchanges."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MIN_STD = 1e-6  # relative to the column's scale: below it a column counts as constant and is not scaled


class Standardize(nn.Module):
    """(x - mean) / std per column, from the buffers ``mean`` and ``second`` (mean of squares)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("second", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = (self.second - self.mean**2).clamp(min=0.0)
        std = var.sqrt()
        std = torch.where(std > MIN_STD * (1.0 + self.mean.abs()), std, torch.ones_like(std))
        return (x - self.mean) / std

    @torch.no_grad()
    def fit(self, x: np.ndarray) -> None:
        """Set the moments from the rows of ``x`` (computed in float64)."""
        x64 = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        self.mean.copy_(torch.from_numpy(x64.mean(axis=0)))
        self.second.copy_(torch.from_numpy((x64**2).mean(axis=0)))


def standardizers(model: nn.Module) -> dict[str, Standardize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Standardize)}


def fit_standardizers(model: nn.Module, x: np.ndarray) -> None:
    """Fill every Standardize layer that sees the raw inputs from the local training rows ``x``."""
    for module in standardizers(model).values():
        module.fit(x)


def standardizer_buffers(model: nn.Module) -> set[str]:
    """The state names of the Standardize statistics (they differ between nodes until the first merges)."""
    return {f"{name}.{b}" if name else b for name in standardizers(model) for b in ("mean", "second")}

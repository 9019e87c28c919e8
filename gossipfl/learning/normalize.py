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

REL_VAR_FLOOR = 1e-12  # a variance under this fraction of mean**2 is float64 rounding: a constant column
ABS_VAR_FLOOR = 1e-300  # and an exactly constant column of zeros


class Standardize(nn.Module):
    """(x - mean) / std per column, from the buffers ``mean`` and ``second`` (mean of squares). The
    buffers are float64: the variance is their difference, which float32 would lose to cancellation for
    a column whose spread is small next to its mean (1e4 +- 1). A column whose variance is not above
    float64 rounding of its mean (a constant column) is centred but not scaled."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("second", torch.ones(features, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = self.second - self.mean**2
        scaled = var > (REL_VAR_FLOOR * self.mean**2).clamp(min=ABS_VAR_FLOOR)
        std = torch.where(scaled, var.clamp(min=ABS_VAR_FLOOR).sqrt(), torch.ones_like(var))
        return ((x.to(torch.float64) - self.mean) / std).to(x.dtype)

    @torch.no_grad()
    def fit(self, x: np.ndarray) -> None:
        """Set the moments from the rows of ``x``, whose width must be ``features``."""
        x64 = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if x64.shape[1] != self.features:
            raise ValueError(
                f"Standardize({self.features}) was given inputs of width {x64.shape[1]}: it must be the "
                "model's first layer, taking the raw input columns"
            )
        self.mean.copy_(torch.from_numpy(x64.mean(axis=0)))
        self.second.copy_(torch.from_numpy((x64**2).mean(axis=0)))


def standardizers(model: nn.Module) -> dict[str, Standardize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Standardize)}


def fit_standardizers(model: nn.Module, x: np.ndarray) -> None:
    """Fill the model's Standardize layers from the local training rows ``x``. A Standardize layer must be
    the model's first, taking the raw input columns (ValueError when its width does not match them)."""
    for module in standardizers(model).values():
        module.fit(x)


def standardizer_buffers(model: nn.Module) -> set[str]:
    """The state names of the Standardize statistics (they differ between nodes until the first merges)."""
    return {f"{name}.{b}" if name else b for name in standardizers(model) for b in ("mean", "second")}

"""Input standardisation the network agrees on (gossipfl/learning/normalize.py): statistics in the model,
fitted to the local shard, averaged by the gossip like parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gossipfl.assembly import build_learner
from gossipfl.config import NodeConfig
from gossipfl.learning.normalize import Standardize, fit_standardizers, standardizer_buffers
from gossipfl.learning.tasks.tabular import TabularTask

from .helpers import running, wait_for

SCALES = np.array([1e-3, 1.0, 40.0, 4000.0, 0.05])  # columns from about 0.001 to about 4,000, as in clinical tables


def unscaled_table(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.normal(size=(n, 5)) + 2.5 * np.eye(3, 5)[y]) * SCALES + 10 * SCALES  # offsets too
    return x.astype(np.float32), y.astype(np.int64)


def test_standardize_makes_columns_zero_mean_unit_variance_and_leaves_constant_columns_unscaled():
    x = np.column_stack([unscaled_table()[0], np.full(240, 7.0, np.float32)])
    layer = Standardize(6)
    layer.fit(x)
    out = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out[:, :5].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out[:, :5].std(axis=0), 1.0, atol=1e-3)
    assert (out[:, 5] == 0.0).all()  # constant: centred, not divided by a zero spread
    assert layer(torch.full((1, 6), 8.0))[0, 5].item() == 1.0


def test_averaged_moments_standardise_like_the_pooled_data():
    """Two equal shards with different means: the average of their (mean, mean of squares) is the pooled
    data's, so the variance taken from averaged moments is the pooled variance (an average of variances
    would miss the spread between the shards)."""
    x, _ = unscaled_table()
    a, b = Standardize(5), Standardize(5)
    a.fit(x[:120] + SCALES.astype(np.float32))
    b.fit(x[120:] - SCALES.astype(np.float32))
    pooled = Standardize(5)
    pooled.fit(np.concatenate([x[:120] + SCALES, x[120:] - SCALES]))
    merged = Standardize(5)
    merged.mean.copy_((a.mean + b.mean) / 2)
    merged.second.copy_((a.second + b.second) / 2)
    probe = torch.from_numpy(x[:10])
    torch.testing.assert_close(merged(probe), pooled(probe), rtol=1e-4, atol=1e-4)


def test_the_statistics_are_gossiped_state_and_only_input_layers_are_fitted():
    model = nn.Sequential(Standardize(5), nn.Linear(5, 3))
    fit_standardizers(model, unscaled_table()[0])
    assert standardizer_buffers(model) == {"0.mean", "0.second"}
    assert model[0].mean[3].item() == pytest.approx(4000 * 10, rel=0.05)


def test_a_tabular_node_learns_unscaled_columns_with_the_default_options(tmp_path):
    x, y = unscaled_table()
    np.savez(tmp_path / "t.npz", x=x, y=y)
    task = TabularTask(str(tmp_path / "t.npz"))
    data = task.load_data(2026)
    learner = build_learner(task, data.train, data.test, NodeConfig(task="tabular"))
    learner.train_steps(400)
    assert learner.evaluate().accuracy >= 0.9
    # the premise: the same model without the layer stays near one class with these defaults
    raw = TabularTask(str(tmp_path / "t.npz"))
    raw.build_model = lambda: nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 3))  # type: ignore[method-assign]
    baseline = build_learner(raw, data.train, data.test, NodeConfig(task="tabular"))
    baseline.train_steps(400)
    assert baseline.evaluate().accuracy < 0.6


async def test_nodes_agree_on_the_statistics_through_gossip_and_share_one_initial_model(tmp_path, make_config):
    x, y = unscaled_table()
    np.savez(tmp_path / "t.npz", x=x, y=y)
    common = dict(task="tabular", data=str(tmp_path / "t.npz"), partition_scheme="dirichlet:0.5", gossip_interval=0.2)
    async with running(make_config(id="std-a", partition="0/2", **common)) as (a,):
        before_a = a.learner.snapshot().params["0.mean"].copy()
        async with running(make_config(id="std-b", partition="1/2", seeds=(f"127.0.0.1:{a.port}",), **common)) as (b,):
            before_b = b.learner.snapshot().params["0.mean"]
            assert not np.allclose(before_a, before_b)  # skewed shards: different local statistics
            assert a.identity.init == b.identity.init  # ... yet one shared initial model is advertised
            assert await wait_for(lambda: a.gossiper.stats.ok + b.gossiper.stats.ok >= 3, timeout=30)
            await a.stop()
            await b.stop()
            ma, mb = a.learner.snapshot().params["0.mean"], b.learner.snapshot().params["0.mean"]
    np.testing.assert_allclose(ma, mb, rtol=1e-5)  # every merge averages them: after the last one, equal
    np.testing.assert_allclose(ma, (before_a + before_b) / 2, rtol=1e-4)  # `average`: the plain mean

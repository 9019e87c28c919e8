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


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk:0.1"])
async def test_nodes_agree_on_the_statistics_through_gossip_and_share_one_initial_model(tmp_path, make_config, codec):
    """Whatever --compress says, the statistics (float64 moments, whose variance second - mean^2 cancels
    badly) travel whole and uncompressed: a lossy codec or a top-k choice per tensor would leave them an
    invalid pair of moments (a negative variance), or never mixed (fp16 clips 1e8 to 65504)."""
    x, y = unscaled_table()
    np.savez(tmp_path / "t.npz", x=x, y=y)
    common = dict(
        task="tabular", data=str(tmp_path / "t.npz"), partition_scheme="dirichlet:0.5", gossip_interval=0.2,
        compress=codec,
    )  # fmt: skip
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
    second = a.learner.snapshot().params["0.second"]
    assert np.array_equal(second, b.learner.snapshot().params["0.second"]) and (second - ma**2 >= 0).all()


@pytest.mark.parametrize(("mean", "sd"), [(1e4, 1.0), (3e6, 20.0), (5e-7, 1e-7), (881.0, 350.0)])
def test_columns_with_a_small_spread_next_to_their_mean_are_still_scaled(mean, sd):
    x = (mean + sd * np.random.default_rng(1).standard_normal((500, 1))).astype(np.float64)
    layer = Standardize(1)
    layer.fit(x)
    out = layer(torch.from_numpy(x)).numpy()
    assert out.std() == pytest.approx(1.0, rel=1e-3)


def test_a_standardize_layer_that_does_not_take_the_raw_inputs_is_refused():
    model = nn.Sequential(nn.Linear(5, 8), Standardize(8))
    with pytest.raises(ValueError, match=r"Standardize\(8\) was given inputs of width 5: it must be the model's first"):
        fit_standardizers(model, unscaled_table()[0])


def test_a_late_merge_keeps_the_statistics_a_valid_pair_of_moments():
    """A merge applied late is current + (merged - sent): with other merges in between, that is not a
    convex mix of the nodes' moments, and second - mean**2 can go negative (the column would then go in
    unscaled). Statistics take the mean of the current and merged values instead."""
    from gossipfl.protocol import merge

    def moments(values):
        v = np.asarray(values, np.float64)
        return {"0.mean": np.array([v.mean()]), "0.second": np.array([(v**2).mean()])}

    sent, other, late_peer = moments([-1800.0]), moments([800.0]), moments([2000.0])
    current = {k: 0.2 * sent[k] + 0.8 * other[k] for k in sent}  # a `samples` merge (50:200 rows) landed first
    merged = {k: 0.5 * sent[k] + 0.5 * late_peer[k] for k in sent}
    rebased = merge.rebase(current, sent, merged)
    assert rebased["0.second"][0] < rebased["0.mean"][0] ** 2  # the problem
    kept = merge.keep_convex(rebased, current, merged, {"0.mean", "0.second"})
    assert kept["0.second"][0] >= kept["0.mean"][0] ** 2
    np.testing.assert_allclose(kept["0.mean"], (current["0.mean"] + merged["0.mean"]) / 2)


async def test_the_exchange_applies_late_merges_to_statistics_as_convex_mixes(tmp_path):
    """The same, through the exchange itself (GossipCore._apply with a merge learned late)."""
    import logging
    import random

    from gossipfl.discovery.peers import PeerTable
    from gossipfl.protocol import merge
    from gossipfl.protocol.gossiper import Gossiper

    x, y = unscaled_table()
    np.savez(tmp_path / "t.npz", x=x, y=y)
    task = TabularTask(str(tmp_path / "t.npz"))
    data = task.load_data(2026)
    learner = build_learner(task, data.train, data.test, NodeConfig(task="tabular"))
    assert learner.statistics == {"0.mean", "0.second"}
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    g = Gossiper(node_id="me", task="tabular", learner=learner, peers=PeerTable("me"), interval=1.0,
                 rng=random.Random(0), log=log)  # fmt: skip

    def set_stats(mean: float, frac: float = 0.0, other: tuple[float, float] = (0.0, 0.0)):
        def fn(now):
            params = dict(now.params)
            params["0.mean"] = np.full(5, (1 - frac) * mean + frac * other[0])
            params["0.second"] = np.full(5, (1 - frac) * mean**2 + frac * other[1])
            return params, now.age, now.weight

        return fn

    learner.update(set_stats(-1800.0))  # the statistics as this node sent them: a column at -1800
    sent = learner.snapshot()
    learner.update(set_stats(-1800.0, 0.8, (800.0, 800.0**2)))  # another merge (0.2 : 0.8) landed first
    merged = dict(sent.params)
    merged["0.mean"] = (sent.params["0.mean"] + 2000.0) / 2  # the late merge, with a peer at 2000
    merged["0.second"] = (sent.params["0.second"] + 2000.0**2) / 2
    await g._apply(sent, merge.Merged(merged, sent.age, sent.weight))
    after = learner.snapshot().params
    assert (after["0.second"] >= after["0.mean"] ** 2).all()

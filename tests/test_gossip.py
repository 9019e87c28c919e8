"""Real nodes in one process gossiping over loopback HTTP, discovered by seeds or by real mDNS."""

import asyncio

import numpy as np
import pytest

from gossipfl.learning.learner import build_seeded
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.protocol import merge
from gossipfl.protocol.consensus import consensus_distance, flatten, network_mean

from .helpers import params_of, running, settled, spread, wait_for

pytestmark = pytest.mark.timeout(90)


def initial_params(seed):
    model = build_seeded(DigitsTask().build_model, seed)
    return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


async def test_seed_sets_the_initial_model(make_config):
    async with running(make_config(no_train=True, seed=3), make_config(no_train=True, seed=4)) as (a, b):
        np.testing.assert_array_equal(flatten(params_of(a)), flatten(initial_params(3)))
        np.testing.assert_array_equal(flatten(params_of(b)), flatten(initial_params(4)))


def test_training_nodes_share_one_initial_model_unless_told_otherwise(make_config):
    from gossipfl.assembly import build_learner, init_seed

    task = DigitsTask()
    data = task.load_data(2026)

    def start(**kw):
        return flatten(build_learner(task, data.train, data.test, make_config(**kw)).snapshot().params)

    # training: the cluster-wide --data-seed seeds the initial model, --seed only the node's randomness
    assert [init_seed(make_config(seed=s)) for s in (0, 7)] == [2026, 2026]
    np.testing.assert_array_equal(start(seed=0), start(seed=7))
    np.testing.assert_array_equal(start(seed=0), flatten(initial_params(2026)))
    assert not np.array_equal(start(seed=0), start(seed=0, data_seed=5))
    # --init-seed overrides; pure averaging starts each node from its own --seed
    np.testing.assert_array_equal(start(seed=0, init_seed=9), flatten(initial_params(9)))
    assert init_seed(make_config(seed=4, no_train=True)) == 4
    assert init_seed(make_config(seed=4, no_train=True, init_seed=1)) == 1


async def test_one_exchange_leaves_both_partners_at_the_exact_average(make_config, http):
    a_cfg = make_config(no_train=True, seed=1, gossip_interval=1000)
    async with running(a_cfg) as (a,):
        b_cfg = make_config(no_train=True, seed=2, gossip_interval=1000, seeds=(f"127.0.0.1:{a.port}",))
        async with running(b_cfg) as (b,):
            assert await wait_for(lambda: a.id in b.peers, timeout=10)
            assert b.peers.get(a.id).source == "static"
            a0, b0 = params_of(a), params_of(b)
            assert await b.gossiper.exchange(http, b.peers.get(a.id)) == "ok"
            await settled(a, b)
            expected = merge.weighted_mean(a0, b0, 1.0, 1.0)
            for k in expected:
                np.testing.assert_array_equal(params_of(a)[k], expected[k])
                np.testing.assert_array_equal(params_of(b)[k], expected[k])
            stats = b.gossiper.stats
            assert stats.ok == 1 and stats.bytes_sent > 19_000 and stats.bytes_received > 19_000
            assert a.gossiper.stats.served == 1
            assert b.peers.get(a.id).alive and b.peers.get(a.id).last_ok is not None


async def test_pure_averaging_conserves_the_mean_and_shrinks_the_spread(make_config, zc):
    """8 nodes, no training, real mDNS on loopback: the network mean stays put while nodes agree."""
    n = 8
    configs = [make_config(no_train=True, seed=i, discovery=("mdns",), gossip_interval=0.2) for i in range(n)]
    inits = [flatten(initial_params(i)) for i in range(n)]
    mean0, spread0 = network_mean(inits), consensus_distance(inits)
    async with running(*configs, zeroconf=zc) as nodes:
        assert await wait_for(lambda: all(len(x.peers) == n - 1 for x in nodes), timeout=20)
        assert all(p["source"] == "mdns" for x in nodes for p in x.peers.describe())
        assert await wait_for(lambda: spread(nodes) < spread0 / 1000, timeout=40, interval=0.2)
    # stopped: every exchange finished, so the mean is exactly what it was, up to float32 rounding
    final = [flatten(params_of(x)) for x in nodes]
    np.testing.assert_allclose(network_mean(final), mean0, rtol=0, atol=1e-6)
    assert consensus_distance(final) < spread0 / 1000
    assert sum(x.gossiper.stats.ok for x in nodes) >= 20


async def test_training_options_reach_the_learner(make_config):
    import torch

    cfg = make_config(optimizer="sgd", lr=0.05, momentum=0.5, lr_decay_steps=0, batch_size=16, partition="1/4")
    async with running(cfg) as (node,):
        opt = node.learner.optimizer
        assert isinstance(opt, torch.optim.SGD)
        assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["momentum"] == 0.5
        assert node.learner.lr_at(10_000) == 0.05 and node.learner.batch_size == 16
        assert node.learner.train_size in (359, 360)


async def test_mdns_peers_that_cannot_be_gossiped_with_are_ignored_with_the_reason(make_config, zc, cluster, caplog):
    import socket

    from zeroconf.asyncio import AsyncServiceInfo

    from gossipfl.discovery.mdns import SERVICE_TYPE

    good = {"proto": "2", "task": "digits", "merge": "average", "split": "2026/1/iid"}
    variants = {
        "mnist-node": {"task": "mnist"},
        "old-node": {"proto": "1"},
        "future-node": {"proto": "3"},
        "wide-node": {"model": "0123456789ab"},
        "pushsum-node": {"merge": "pushsum"},
        "reseeded-node": {"split": "7/1/iid"},
        "eight-shard-node": {"split": "2026/8/iid"},
        "good-node": {},
        "other-init-node": {"init": "fedcba987654"},  # a warning, not a refusal
    }
    others = [
        AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=9,
            properties={"txtvers": "1", "id": name, "cluster": cluster, **good, **change},
        )
        for name, change in variants.items()
    ]
    # registered together: each registration probes for ~1.7 s, one after the other they took 15 s
    await asyncio.gather(*[await zc.async_register_service(info) for info in others])
    try:
        async with running(make_config(discovery=("mdns",), gossip_interval=1000), zeroconf=zc) as (node,):
            assert await wait_for(lambda: len(node.peers) + len(node.status()["ignored_peers"]) == 9, timeout=15)
            assert sorted(p.id for p in node.peers.all()) == ["good-node", "other-init-node"]
            assert node.peers.get("good-node").url == "http://127.0.0.1:9"
            reasons = {p["id"]: p["reason"] for p in node.status()["ignored_peers"]}
            assert reasons == {
                "mnist-node": "task 'mnist', ours 'digits'",
                "old-node": "protocol '1', ours '2'",
                "future-node": "protocol '3', ours '2'",
                "wide-node": f"model shape 0123456789ab, ours {node.gossiper.model_digest}",
                "pushsum-node": "merge rule 'pushsum', ours 'average'",
                "reseeded-node": "data split 7/1/iid (data-seed/shards/scheme), ours 2026/1/iid",
                "eight-shard-node": "data split 2026/8/iid (data-seed/shards/scheme), ours 2026/1/iid",
            }
            assert node.status()["init_model"] == node.identity.init and node.identity.init
            assert any(
                "other-init-node" in r.getMessage() and "another initial model" in r.getMessage()
                for r in caplog.records
            )
            assert not any("good-node" in r.getMessage() and "initial model" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.gather(*[await zc.async_unregister_service(info) for info in others])


async def test_a_seed_with_another_task_is_ignored_and_shown(make_config):
    async with running(make_config(task="digits-cnn", gossip_interval=1000)) as (cnn,):
        async with running(make_config(seeds=(f"127.0.0.1:{cnn.port}",), gossip_interval=1000)) as (mlp,):
            assert await wait_for(lambda: mlp.status()["ignored_peers"], timeout=10)
            assert mlp.status()["ignored_peers"] == [
                {"id": cnn.id, "url": cnn.url, "reason": "task 'digits-cnn', ours 'digits'"}
            ]
            assert len(mlp.peers) == 0
            assert mlp.status()["model"] != cnn.status()["model"]


@pytest.mark.parametrize("rule", ["average", "age", "samples", "pushsum"])
async def test_one_exchange_applies_the_merge_rule_on_both_sides(make_config, http, rule):
    a_cfg = make_config(no_train=True, seed=1, gossip_interval=1000, merge=rule, partition="0/4")
    b_cfg = make_config(no_train=True, seed=2, gossip_interval=1000, merge=rule, partition="1/2")
    async with running(a_cfg, b_cfg) as (a, b):
        a.learner.update(lambda s: (s.params, 30, 5.0))  # give the partners different ages and weights
        b.learner.update(lambda s: (s.params, 90, 1.0))
        sa, sb = a.learner.snapshot(), b.learner.snapshot()
        expected = merge.RULES[rule](
            merge.Side(sa.params, sa.age, a.learner.train_size, sa.weight),
            merge.Side(sb.params, sb.age, b.learner.train_size, sb.weight),
        )
        b.peers.upsert(a.id, a.url, "digits", "static")
        assert await b.gossiper.exchange(http, b.peers.get(a.id)) == "ok"
        await settled(a, b)
        for node in (a, b):
            state = node.learner.snapshot()
            assert state.age == 90 and state.weight == 3.0
            for k in expected.params:
                np.testing.assert_array_equal(state.params[k], expected.params[k])


async def test_peers_with_another_merge_rule_are_refused(make_config, http):
    from gossipfl.protocol import wire

    async with running(make_config(no_train=True, merge="pushsum")) as (node,):
        state = node.learner.snapshot()
        other_rule = wire.GossipMessage("x", 0, state.params, "digits", "average", 10, 1.0)
        no_weight = wire.GossipMessage("x", 0, state.params, "digits", "pushsum", 10, None)
        for msg, fragment in [
            (other_rule, "merge rule 'average' does not match this node's 'pushsum'"),
            (no_weight, "merge rule 'pushsum' needs field 'weight'"),
        ]:
            async with http.post(node.url + "/v1/gossip", data=wire.encode(msg).tobytes()) as r:
                assert r.status == 400 and fragment in (await r.json())["error"]
        assert node.learner.snapshot().version == state.version


async def test_clusters_do_not_mix(make_config, zc, http, cluster):
    from gossipfl.protocol import wire

    blue_name, green_name = f"{cluster}-blue", f"{cluster}-green"  # (tests running at once have their own)
    quiet = dict(discovery=("mdns",), gossip_interval=1000, join_wait=0)  # (a joining node would answer 409)
    a = make_config(cluster=blue_name, **quiet)
    b = make_config(cluster=green_name, **quiet)
    c = make_config(cluster=green_name, **quiet)
    async with running(a, b, c, zeroconf=zc) as (blue, green1, green2):
        assert await wait_for(lambda: green2.id in green1.peers and green1.id in green2.peers, timeout=15)
        # each has resolved the other cluster's node (so it had every chance to list it) and did not list it
        others = [n.discovery.mdns.other_clusters for n in (blue, green1, green2)]
        assert await wait_for(lambda: blue_name in others[1] and blue_name in others[2], timeout=15)
        assert await wait_for(lambda: len(others[0].get(green_name, ())) == 2, timeout=15)
        assert others[1][blue_name] == {blue.id} and green_name not in others[1]  # (other tests' nodes may show)
        assert len(blue.peers) == 0 and blue.id not in green1.peers and green1.status()["ignored_peers"] == []
        state = blue.learner.snapshot()
        msg = wire.GossipMessage(blue.id, 0, state.params, "digits", "average", 1, 1.0, blue_name, xid=wire.new_xid())
        body = wire.encode(msg).tobytes()
        async with http.post(green1.url + "/v1/gossip", data=body) as r:
            assert r.status == 400
            assert (await r.json())["error"] == f"cluster {blue_name!r} does not match this node's {green_name!r}"

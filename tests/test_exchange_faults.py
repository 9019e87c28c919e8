"""Exchanges happen on both sides or on neither: every phase of an exchange lost, delayed or cut off by
a partner that stops, between two real nodes (pure averaging) through a fault-injecting proxy."""

import asyncio

import aiohttp
import numpy as np
import pytest

from gossipfl.consensus import flatten

from .faults import FaultProxy, Phase
from .helpers import params_of, running, wait_for

pytestmark = pytest.mark.timeout(60)

FAST = 0.6  # seconds the initiator waits for each request in these tests (the default is 2 s and up)

SCENARIOS = {
    # name: (faults per phase, result of the exchange, whether it merged in the end)
    "no fault": ({}, "ok", True),
    "prepare lost on the way": ({"prepare": [Phase.LOSE_REQUEST]}, "failed", False),
    "prepare's reply lost": ({"prepare": [Phase.LOSE_REPLY]}, "failed", False),
    "prepare's reply and the abort lost": (
        {"prepare": [Phase.LOSE_REPLY], "abort": [Phase.LOSE_REQUEST]},
        "failed",
        False,
    ),
    "prepare arrives after the initiator gave up": ({"prepare": [Phase.DELAY]}, "failed", False),
    # the initiator asks again before the responder's prepared exchange expires: it commits then
    "commit lost on the way": ({"commit": [Phase.LOSE_REQUEST]}, "in_doubt", True),
    "commit's reply lost": ({"commit": [Phase.LOSE_REPLY]}, "in_doubt", True),
    "commit arrives late, its retry first": ({"commit": [Phase.DELAY]}, "in_doubt", True),
    # ...but not when its retries are lost too: by the fourth try the prepared exchange has expired
    "commit lost three times": ({"commit": [Phase.LOSE_REQUEST] * 3}, "in_doubt", False),
    "commit's reply lost twice": ({"commit": [Phase.LOSE_REPLY, Phase.LOSE_REPLY]}, "in_doubt", True),
}


def quick(node, *, ttl: float = 3.0) -> None:
    g = node.gossiper
    g.timeout = g.decide_timeout = aiohttp.ClientTimeout(total=FAST)
    g.ledger.prepare_ttl = ttl
    g.doubts.retry_base = 0.3


async def settle(a, b, http, proxy, timeout: float = 15.0) -> None:
    """Until a has nothing in doubt or in flight and b nothing prepared, and the proxy holds nothing."""

    def quiet():
        b.gossiper.expire()
        return not a.gossiper.doubts and not a.gossiper.outbound and not len(b.gossiper.ledger)

    deadline = asyncio.get_running_loop().time() + timeout
    while not quiet():
        assert asyncio.get_running_loop().time() < deadline, "exchange did not settle"
        a.gossiper.resolve_doubts(http)
        await asyncio.sleep(0.1)
    while proxy.holding:  # until what the proxy held has been delivered or dropped
        assert asyncio.get_running_loop().time() < deadline, "proxy still holding requests"
        await asyncio.sleep(0.1)
    b.gossiper.expire()


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_an_exchange_happens_on_both_sides_or_on_neither(make_config, http, name):
    faults, expected_result, merges = SCENARIOS[name]
    cfg = dict(no_train=True, gossip_interval=1000, discovery=("static",))
    async with running(make_config(seed=1, **cfg), make_config(seed=2, **cfg)) as (a, b):
        quick(a)
        quick(b)
        proxy = FaultProxy(b.url, hold=4.0)
        proxy.plan.update({k: list(v) for k, v in faults.items()})
        async with proxy.running() as via:
            a.peers.upsert(b.id, via, "digits", "static")
            a0, b0 = params_of(a), params_of(b)
            total0 = flatten(a0) + flatten(b0)
            result = await a.gossiper.exchange(http, a.peers.get(b.id))
            assert result == expected_result, proxy.forwarded
            a.peers.remove(b.id)  # no new exchange: only this one is settled
            await settle(a, b, http, proxy)
        a1, b1 = params_of(a), params_of(b)
        changed = [not all(np.array_equal(x[k], y[k]) for k in x) for x, y in ((a0, a1), (b0, b1))]
        assert changed == [merges, merges], (changed, proxy.forwarded)
        assert (a.learner.merges, b.learner.merges) == (int(merges), int(merges))
        np.testing.assert_allclose(flatten(a1) + flatten(b1), total0, rtol=0, atol=1e-6)
        if merges:  # both hold the exact average, bit for bit
            for k in a1:
                np.testing.assert_array_equal(a1[k], b1[k])
                np.testing.assert_array_equal(a1[k], a0[k] * np.float32(0.5) + b0[k] * np.float32(0.5))


async def test_a_responder_that_stops_after_preparing_merges_nothing_and_the_initiator_gives_up(make_config, http):
    cfg = dict(no_train=True, gossip_interval=1000, discovery=("static",))
    async with running(make_config(seed=1, **cfg)) as (a,):
        quick(a)
        a.gossiper.doubts.give_up_s = 2.0
        a0 = params_of(a)
        async with running(make_config(seed=2, **cfg)) as (b,):
            proxy = FaultProxy(b.url, hold=2.5)
            proxy.plan["commit"] = [Phase.LOSE_REQUEST]
            async with proxy.running() as via:
                a.peers.upsert(b.id, via, "digits", "static")
                assert await a.gossiper.exchange(http, a.peers.get(b.id)) == "in_doubt"
                a.peers.remove(b.id)
        # b is gone for good: a keeps asking, then gives up, and never merges
        assert await wait_for(lambda: (a.gossiper.resolve_doubts(http), not a.gossiper.doubts)[1], timeout=10)
        assert a.learner.merges == 0
        for k, v in params_of(a).items():
            np.testing.assert_array_equal(v, a0[k])


async def test_an_initiator_that_vanishes_after_preparing_leaves_the_responder_unchanged(make_config, http):
    cfg = dict(no_train=True, gossip_interval=1000, discovery=("static",))
    async with running(make_config(seed=2, **cfg)) as (b,):
        quick(b, ttl=0.5)
        b0 = params_of(b)
        async with running(make_config(seed=1, **cfg)) as (a,):
            quick(a)
            proxy = FaultProxy(b.url, hold=1.0)
            proxy.plan["commit"] = [Phase.LOSE_REQUEST]  # a's commit never reaches b...
            async with proxy.running() as via:
                a.peers.upsert(b.id, via, "digits", "static")
                assert await a.gossiper.exchange(http, a.peers.get(b.id)) == "in_doubt"
        # ...and a is gone before it could ask again: b's prepared exchange expires, nothing merged
        assert await wait_for(lambda: (b.gossiper.expire(), not len(b.gossiper.ledger))[1], 5)
        assert b.learner.merges == 0 and b.gossiper.stats.declined == 1
        for k, v in params_of(b).items():
            np.testing.assert_array_equal(v, b0[k])

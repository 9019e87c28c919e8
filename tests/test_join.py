"""Joining late (protocol/joining.py): a node with no checkpoint that finds trained peers starts from the
most trained one's model before its first local step; meanwhile it neither starts nor accepts exchanges,
so no trained peer averages with its untrained model."""

from __future__ import annotations

import asyncio

from gossipfl.protocol import wire

from .helpers import message, running, wait_for
from .test_members import write_key

KEY = b"join-test-cluster-key-0123456789abcdef"


async def test_a_late_joiner_starts_from_a_trained_peer_model_signed_reads_included(make_config, tmp_path):
    key = write_key(tmp_path / "k", KEY)
    fast = dict(secret_file=key, gossip_interval=0.2, train_interval=0.02)
    async with running(make_config(id="j-a", **fast)) as (a,):
        seed = (f"127.0.0.1:{a.port}",)
        async with running(make_config(id="j-b", seeds=seed, **fast)) as (b,):
            assert await wait_for(lambda: a.last_eval is not None and a.last_eval.accuracy > 0.85, 60)
            trained_age = a.learner.age
            # it barely trains on its own (one step a minute), so what it knows after joining came from a peer
            late = make_config(id="j-late", seeds=seed, secret_file=key, train_interval=60, steps_per_round=1)
            async with running(late) as (c,):
                assert await wait_for(lambda: c.status()["join"]["state"] == "joined", 15), c.status()["join"]
                joined = c.status()["join"]
                assert joined["peer"] in ("j-a", "j-b") and joined["age"] >= trained_age
                assert c.learner.steps <= 1 and c.learner.age >= trained_age  # adopted, not trained
                accuracy = (await asyncio.to_thread(c.learner.evaluate_working)).accuracy
                assert accuracy > 0.8, accuracy  # the network's accuracy, not an untrained model's ~0.1


async def test_while_joining_a_node_declines_exchanges_and_keeps_its_model(make_config, http):
    nowhere = ("127.0.0.1:9",)  # a seed that never answers: the node waits for peers
    async with running(make_config(seeds=nowhere, join_wait=30)) as (n,):
        assert n.status()["join"]["state"] == "waiting" and n.gossiper.holding is not None
        before = n.learner.snapshot()
        body = message(n, {k: v + 1 for k, v in before.params.items()}, age=500)
        async with http.post(n.url + "/v1/gossip", data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as r:
            assert r.status == 409 and "joining" in (await r.json())["error"]
        after = n.learner.snapshot()
        assert after.version == before.version and n.learner.steps == 0 and not n.status()["training"]


async def test_peers_that_have_not_trained_yet_let_a_node_train_at_once(make_config):
    """A cluster starting together: nobody has anything to pull, so nobody waits out --join-wait."""
    async with running(make_config(id="u-a", no_train=True)) as (a,):
        seed = (f"127.0.0.1:{a.port}",)
        async with running(make_config(id="u-b", seeds=seed, join_wait=30)) as (b,):
            assert await wait_for(lambda: b.status()["join"]["state"] == "untrained", 10), b.status()["join"]
            assert await wait_for(lambda: b.learner.steps > 0, 10)


async def test_a_node_that_finds_no_peer_trains_alone_after_the_wait(make_config):
    async with running(make_config(seeds=("127.0.0.1:9",), join_wait=0.5)) as (n,):
        assert await wait_for(lambda: n.status()["join"]["state"] == "alone", 5)
        assert await wait_for(lambda: n.learner.steps > 0, 5) and n.gossiper.holding is None


async def test_no_wait_without_a_way_to_find_peers_or_with_push_sum(make_config):
    async with running(make_config(), make_config(merge="pushsum", seeds=("127.0.0.1:9",))) as nodes:
        for n in nodes:
            assert n.status()["join"]["state"] == "skipped"
            assert await wait_for(lambda n=n: n.learner.steps > 0, 5)


async def test_a_joiner_refuses_a_model_that_is_not_its_peers(make_config, tmp_path):
    """The model read must be the peer's own (sender = the id it was asked as) and fit this node's model:
    a peer whose /v1/model answers garbage is passed over, and the node keeps waiting."""
    async with running(make_config(id="g-a")) as (a,):

        async def garbage() -> bytes:
            return b"\xc1 not msgpack"

        a.model_payload = garbage  # type: ignore[method-assign]
        assert await wait_for(lambda: a.learner.age > 0, 10)
        seed = (f"127.0.0.1:{a.port}",)
        async with running(make_config(id="g-b", seeds=seed, join_wait=3)) as (b,):
            await asyncio.sleep(1.5)
            assert b.status()["join"]["state"] == "waiting" and b.learner.merges == 0
            assert await wait_for(lambda: b.status()["join"]["state"] == "alone", 5)
            assert b.learner.merges == 0 or b.learner.steps > 0


async def test_a_node_stopped_while_waiting_to_join_leaves_no_checkpoint(make_config, tmp_path):
    """Else it would resume its untrained model next time, skip the join and drag its peers back."""
    async with running(make_config(seeds=("127.0.0.1:9",), join_wait=30, state_dir=str(tmp_path))) as (n,):
        assert n.status()["join"]["state"] == "waiting"
    assert not list(tmp_path.rglob("state.json"))
    async with running(make_config(id=n.id, seeds=("127.0.0.1:9",), join_wait=30, state_dir=str(tmp_path))) as (m,):
        assert m.status()["join"]["state"] == "waiting" and not m.status()["checkpoint"]["resumed"]

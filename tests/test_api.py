"""One real node on loopback, HTTP over real sockets: the contract and every kind of bad input."""

import asyncio
import contextlib

import msgpack
import numpy as np
import pytest
from aiohttp import web

from gossipfl import wire
from gossipfl.peers import Peer

from .helpers import message, params_of, running

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def fake_peer(handler, port):
    """A stand-in peer on loopback whose /v1/gossip answers with ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/gossip", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.fixture
async def node(make_config):
    async with running(make_config(no_train=True)) as nodes:
        yield nodes[0]


async def test_status_has_the_documented_fields(node, http):
    async with http.get(node.url + "/v1/status") as r:
        assert r.status == 200
        s = await r.json()
    assert s["id"] == node.id and s["task"] == "digits" and s["age"] == 0 and s["steps"] == 0
    assert s["peers"] == []
    assert set(s["metrics"]) >= {"accuracy", "loss"}
    assert set(s["exchanges"]) >= {"ok", "failed"}
    assert s["samples"] == 1437 and s["partition"] == "0/1" and s["partition_scheme"] == "iid"
    assert len(s["class_histogram"]) == 10 and sum(s["class_histogram"]) == 1437
    assert s["merge"] == {"rule": "average", "weight": 1437.0}


async def test_model_endpoint_serves_the_wire_payload(node, http):
    async with http.get(node.url + "/v1/model") as r:
        assert r.status == 200 and r.content_type == "application/msgpack"
        msg = wire.decode(await r.read(), node.gossiper.spec)
    assert msg.sender == node.id and msg.task == "digits"
    for k, v in params_of(node).items():
        np.testing.assert_array_equal(msg.params[k], v)


async def test_valid_gossip_replies_pre_merge_params_and_averages(node, http):
    before = params_of(node)
    theirs = {k: np.full_like(v, 0.25) for k, v in before.items()}
    async with http.post(node.url + "/v1/gossip", data=message(node, theirs, age=9)) as r:
        assert r.status == 200
        reply = wire.decode(await r.read(), node.gossiper.spec)
    for k in before:
        np.testing.assert_array_equal(reply.params[k], before[k])
        np.testing.assert_array_equal(params_of(node)[k], (before[k] + theirs[k]) * np.float32(0.5))
    assert node.learner.age == 9  # the older partner's age
    assert node.gossiper.stats.served == 1


def tamper(node, **change):
    obj = msgpack.unpackb(message(node), raw=False)
    for path, value in change.items():
        target = obj
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        if value is DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return msgpack.packb(obj, use_bin_type=True)


DELETE = object()


def bad_bodies(node):
    name = "1.weight"
    good = params_of(node)[name]
    nan = good.copy()
    nan[0, 0] = np.nan
    return [
        ("malformed msgpack", b"\x93\x01"),
        ("malformed msgpack", b"not msgpack at all \xff\xfe"),
        ("must be a msgpack map", msgpack.packb([1, 2])),
        ("unsupported protocol version 7", tamper(node, v=7)),
        ("missing field 'v'", tamper(node, v=DELETE)),
        ("missing field 'sender'", tamper(node, sender=DELETE)),
        ("missing field 'params'", tamper(node, params=DELETE)),
        ("missing parameters: 1.weight", tamper(node, **{"params__1.weight": DELETE})),
        ("unknown parameters: bogus", tamper(node, params__bogus={"dtype": "<f4", "shape": [1], "data": b"\0" * 4})),
        ("dtype '<f8', expected '<f4'", tamper(node, **{"params__1.weight__dtype": "<f8"})),
        ("shape [64], expected [64, 64]", tamper(node, **{"params__1.weight__shape": [64]})),
        ("data bytes, expected 16384", tamper(node, **{"params__1.weight__data": b"\0" * 12})),
        ("NaN or Inf", tamper(node, **{"params__1.weight__data": nan.tobytes()})),
        ("task 'mnist' does not match", tamper(node, task="mnist")),
    ]


async def test_every_bad_message_is_a_400_naming_the_problem_and_changes_nothing(node, http):
    before = node.learner.snapshot()
    for fragment, body in bad_bodies(node):
        async with http.post(node.url + "/v1/gossip", data=body) as r:
            assert r.status == 400, fragment
            err = await r.json()
        assert set(err) == {"error"} and fragment in err["error"], (fragment, err)
    after = node.learner.snapshot()
    assert after.version == before.version and after.age == before.age
    for k in before.params:
        np.testing.assert_array_equal(after.params[k], before.params[k])
    assert node.gossiper.stats.rejected == len(bad_bodies(node))
    async with http.get(node.url + "/v1/status") as r:  # still serving
        assert r.status == 200


async def test_oversized_bodies_are_413(node, http):
    limit = node.gossiper.max_body
    async with http.post(node.url + "/v1/gossip", data=b"\0" * (limit + 1)) as r:
        assert r.status == 413
        assert "exceeds" in (await r.json())["error"]

    async def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    async with http.post(node.url + "/v1/gossip", data=chunks()) as r:
        assert r.status == 413
    assert node.learner.snapshot().version == 0


async def test_unknown_routes_and_methods_answer_json(node, http):
    async with http.get(node.url + "/v1/nope") as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.get(node.url + "/v1/gossip") as r:
        assert r.status == 405 and "error" in await r.json()


async def test_a_node_in_an_exchange_answers_409(node, http, unused_tcp_port):
    release = asyncio.Event()

    async def slow_peer(request):  # a peer that holds the exchange open
        await release.wait()
        return web.Response(status=503)

    async with fake_peer(slow_peer, unused_tcp_port):
        peer = Peer("slow", f"http://127.0.0.1:{unused_tcp_port}", "digits", "static")
        node.peers.upsert(peer.id, peer.url, "digits", "static")
        exchange = asyncio.ensure_future(node.gossiper.exchange(http, peer))
        await asyncio.sleep(0.3)
        assert node.gossiper.busy
        async with http.post(node.url + "/v1/gossip", data=message(node)) as r:
            assert r.status == 409 and "busy" in (await r.json())["error"]
        release.set()
        assert await exchange == "failed"  # the slow peer finally answered 503
        assert not node.gossiper.busy
        assert node.peers.get("slow").failures == 1
        assert node.learner.snapshot().version == 0


async def test_a_peer_with_an_invalid_reply_leaves_the_model_unchanged(node, http, unused_tcp_port):
    async def liar(request):
        return web.Response(
            body=msgpack.packb({"v": 1, "sender": "liar", "age": 0, "params": {}}), content_type="application/msgpack"
        )

    async with fake_peer(liar, unused_tcp_port):
        peer = Peer("liar", f"http://127.0.0.1:{unused_tcp_port}", "digits", "static")
        node.peers.upsert(peer.id, peer.url, "digits", "static")
        assert await node.gossiper.exchange(http, peer) == "failed"
        assert node.gossiper.stats.failed == 1 and node.learner.snapshot().version == 0


async def test_an_oversized_reply_is_refused_before_it_is_buffered(node, http, unused_tcp_port):
    async def flood(request):
        resp = web.StreamResponse()  # chunked: no Content-Length to check up front
        await resp.prepare(request)
        for _ in range(node.gossiper.max_body // 65536 + 4):
            await resp.write(b"\0" * 65536)
        return resp

    async with fake_peer(flood, unused_tcp_port):
        peer = Peer("flood", f"http://127.0.0.1:{unused_tcp_port}", "digits", "static")
        node.peers.upsert(peer.id, peer.url, "digits", "static")
        assert await node.gossiper.exchange(http, peer) == "failed"
        assert node.learner.snapshot().version == 0

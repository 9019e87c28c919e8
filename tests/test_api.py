"""One real node on loopback, HTTP over real sockets: the contract and every kind of bad input."""

import contextlib

import msgpack
import numpy as np
import pytest
from aiohttp import web

from gossipfl.discovery.peers import Peer
from gossipfl.protocol import wire

from .helpers import message, params_of, running, settled

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
    # every documented field, and nothing else (docs/http-api.md lists them)
    assert set(s) == {
        "id", "protocol", "task", "cluster", "url", "age", "steps", "merges", "partition", "partition_from",
        "partition_scheme", "split", "eval_split", "init_model", "samples", "class_histogram", "training",
        "failure", "device", "served", "merge", "checkpoint", "join", "uptime_s", "model", "peers", "ignored_peers",
        "security", "metrics", "exchanges", "upload", "loops", "group", "privacy",
    }  # fmt: skip
    assert s["upload"] == {"compress": "none", "rate_bytes_per_s": 0.0, "max_bytes_per_s": None, "wait_s": 0.0}
    assert s["id"] == node.id and s["task"] == "digits" and s["age"] == 0 and s["steps"] == 0
    assert s["protocol"] == 2 and s["merges"] == 0 and s["cluster"] == node.config.cluster
    assert s["url"] == node.url and s["device"] == "cpu" and s["training"] is False and s["failure"] is None
    assert s["peers"] == [] and s["ignored_peers"] == []
    assert set(s["metrics"]) == {"accuracy", "loss", "train_loss"}
    assert set(s["exchanges"]) == {
        "ok", "failed", "busy", "aborted", "in_doubt", "late", "served", "declined", "rejected", "unauthorized",
        "bytes_sent", "bytes_received", "mean_duration_s", "p50_duration_s", "p99_duration_s",
        "pace_s", "in_flight", "prepared", "doubtful",
    }  # fmt: skip
    assert set(s["loops"]) == {"gossip", "eval", "pex"}  # no train loop with --no-train
    assert set(s["loops"]["eval"]) == {
        "running", "rounds", "errors", "consecutive_errors", "last_error", "last_error_s_ago"
    }  # fmt: skip
    assert s["samples"] == 1437 and s["partition"] == "0/1" and s["partition_scheme"] == "iid"
    assert s["split"] == "2026/1/iid" and s["init_model"] is None  # pure averaging: no shared initial model
    assert len(s["class_histogram"]) == 10 and sum(s["class_histogram"]) == 1437
    assert s["merge"] == {"rule": "average", "weight": 1437.0, "robust": None}
    assert s["served"] == {"age": 0, "local_steps_behind": 0} and s["model"] == node.gossiper.model_digest
    assert s["privacy"] == {  # no --dp-*: DP off, every field there (tests/test_privacy.py: with DP)
        "enabled": False, "epsilon": None, "delta": None, "noise_multiplier": None, "max_grad_norm": None,
        "sample_rate": None, "steps": None, "budget": None, "budget_steps": None, "exhausted": False,
        "accountant": None, "secure_rng": False,
    }  # fmt: skip
    assert s["group"] is None  # pairwise exchanges (a node with --secure-group: tests/test_secure_group.py)


async def test_model_endpoint_serves_the_wire_payload(node, http):
    async with http.get(node.url + "/v1/model") as r:
        assert r.status == 200 and r.content_type == "application/msgpack"
        msg = wire.decode(await r.read(), node.gossiper.spec)
    assert msg.sender == node.id and msg.task == "digits"
    for k, v in params_of(node).items():
        np.testing.assert_array_equal(msg.params[k], v)


async def test_prepare_changes_nothing_and_commit_averages_exactly_once(node, http):
    before = params_of(node)
    theirs = {k: np.full_like(v, 0.25) for k, v in before.items()}
    xid = wire.new_xid()
    body = message(node, theirs, age=9, xid=xid)
    async with http.post(node.url + "/v1/gossip", data=body) as r:
        assert r.status == 200
        reply = wire.decode(await r.read(), node.gossiper.spec)
    assert reply.xid == xid and reply.sender == node.id
    for k in before:  # phase 1 answers with the pre-merge state and merges nothing
        np.testing.assert_array_equal(reply.params[k], before[k])
        np.testing.assert_array_equal(params_of(node)[k], before[k])
    assert node.learner.merges == 0 and node.gossiper.stats.served == 0
    async with http.post(node.url + "/v1/gossip", data=body) as r:  # a retried prepare: the same reply
        assert r.status == 200
        again = wire.decode(await r.read(), node.gossiper.spec)
    for k in before:
        np.testing.assert_array_equal(again.params[k], before[k])
    for _ in range(3):  # the commit, then two retries of it: one merge, the same answer each time
        async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
            assert r.status == 200 and await r.json() == {"xid": xid, "outcome": "committed"}
    await settled(node)  # the commit is answered as soon as it is decided, and applied right after
    for k in before:
        np.testing.assert_array_equal(params_of(node)[k], (before[k] + theirs[k]) * np.float32(0.5))
    assert node.learner.age == 9 and node.learner.merges == 1  # the older partner's age
    assert node.gossiper.stats.served == 1
    async with http.post(node.url + "/v1/gossip", data=body) as r:  # a late copy of a decided exchange
        assert r.status == 409 and "already committed" in (await r.json())["error"]
    async with http.post(f"{node.url}/v1/gossip/{xid}/abort") as r:  # too late to abort: still committed
        assert (await r.json())["outcome"] == "committed"
    assert node.learner.merges == 1


async def test_abort_unknown_and_expired_exchanges_never_merge(node, http):
    before = node.learner.snapshot()
    aborted, unknown, expired = wire.new_xid(), wire.new_xid(), wire.new_xid()
    for xid in (aborted, expired):
        async with http.post(node.url + "/v1/gossip", data=message(node, xid=xid, age=5)) as r:
            assert r.status == 200
    async with http.post(f"{node.url}/v1/gossip/{aborted}/abort") as r:
        assert await r.json() == {"xid": aborted, "outcome": "aborted", "reason": "aborted by the initiator"}
    async with http.post(f"{node.url}/v1/gossip/{unknown}/commit") as r:  # never prepared here
        doc = await r.json()
        assert doc["outcome"] == "aborted" and "unknown exchange" in doc["reason"]
    async with http.post(node.url + "/v1/gossip", data=message(node, xid=unknown)) as r:  # arrives after its commit
        assert r.status == 409 and "already aborted" in (await r.json())["error"]
    node.gossiper.clock = lambda: 1e12  # the prepared exchange's time is up
    async with http.post(f"{node.url}/v1/gossip/{expired}/commit") as r:
        assert (await r.json())["outcome"] == "aborted"
    for xid in (aborted, expired):
        async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == "aborted"
    after = node.learner.snapshot()
    assert (after.merges, after.version, after.age) == (before.merges, before.version, before.age)
    async with http.post(f"{node.url}/v1/gossip/NOT-AN-ID/commit") as r:
        assert r.status == 400 and "32 lowercase hex" in (await r.json())["error"]


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
        ("field 'xid' is required", tamper(node, xid=DELETE)),
        ("'xid' must be 32 lowercase hex digits", tamper(node, xid="zz")),
        ("'age' must be an integer from 0 to 2**53", tamper(node, age=2**63 - 1)),
        ("missing parameters: 1.weight", tamper(node, **{"params__1.weight": DELETE})),
        ("unknown parameters: bogus", tamper(node, params__bogus={"dtype": "<f4", "shape": [1], "data": b"\0" * 4})),
        ("dtype '<f8', expected '<f4'", tamper(node, **{"params__1.weight__dtype": "<f8"})),
        ("shape [64], expected [64, 64]", tamper(node, **{"params__1.weight__shape": [64]})),
        ("data bytes, expected 16384", tamper(node, **{"params__1.weight__data": b"\0" * 12})),
        ("NaN or Inf", tamper(node, **{"params__1.weight__data": nan.tobytes()})),
        ("task 'mnist' does not match", tamper(node, task="mnist")),
        # compressed messages (version 3)
        ("unknown compression 'zstd'", tamper(node, v=3, compress="zstd")),
        ("compression 'int8' in a message of version 2", tamper(node, compress="int8")),
        ("field 'scale' must be bytes", tamper(node, v=3, compress="int8", **{"params__1.weight__data": b"\0" * 4096})),
        ("-128 is out of range", int8(node, data=b"\x80" * 4096)),
        ("scales must be finite and >= 0", int8(node, scale=np.full(16, -1.0, "<f4").tobytes())),
        ("8 scale bytes, expected 64", int8(node, scale=b"\0" * 8)),
        ("strictly increasing and below 4096", topk(node, idx=np.array([5, 4096], "<u4").tobytes())),
        ("strictly increasing", topk(node, idx=np.array([7, 7], "<u4").tobytes())),
        ("8 data bytes, expected 12", topk(node, idx=np.array([1, 2, 3], "<u4").tobytes(), data=b"\0" * 8)),
    ]


def int8(node, **fields):
    """A valid int8 message for ``node``'s model, with these fields of its first tensor replaced."""
    body = {"params__1.weight__data": b"\0" * 4096, "params__1.weight__scale": b"\0" * 64} | {
        f"params__1.weight__{k}": v for k, v in fields.items()
    }
    others = {f"params__{n}__{f}": v for n in params_of(node) if n != "1.weight" for f, v in int8_fields(node, n)}
    return tamper(node, v=3, compress="int8", **body, **others)


def int8_fields(node, name):
    n = params_of(node)[name].size
    return [("data", b"\0" * n), ("scale", b"\0" * (4 * -(-n // 256)))]


def topk(node, **fields):
    """A top-k message for ``node``'s model: one coordinate of every tensor, then these fields of 1.weight."""
    one = {f"params__{n}__idx": np.array([0], "<u4").tobytes() for n in params_of(node)}
    vals = {f"params__{n}__data": np.zeros(1, "<f4").tobytes() for n in params_of(node)}
    mine = {f"params__1.weight__{k}": v for k, v in fields.items()}
    return tamper(node, v=3, compress="topk", **(one | vals | mine))


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
    for valid in (int8(node), topk(node)):  # the compressed bodies above are valid but for what they change
        async with http.post(node.url + "/v1/gossip", data=valid) as r:
            assert r.status == 200, await r.text()


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


async def test_a_retried_prepare_gets_its_reply_even_when_its_first_attempt_holds_the_only_room(node, http):
    """A model of 100 MB leaves room for one prepared exchange; a prepare whose reply was cut is retried with
    the same xid, and the first attempt, prepared, holds that room: the retry says which exchange it repeats
    (Gossipfl-Retry) and gets the same reply. The header lets nothing else in."""
    node.gossiper.ledger.max_prepared = 1
    xid = wire.new_xid()
    body = message(node, xid=xid)
    async with http.post(node.url + "/v1/gossip", data=body) as r:
        assert r.status == 200
        first = await r.read()
    async with http.post(node.url + "/v1/gossip", data=body) as r:  # no room without the header
        assert r.status == 409 and "no room" in (await r.json())["error"]
    async with http.post(node.url + "/v1/gossip", data=body, headers={"Gossipfl-Retry": xid}) as r:
        assert r.status == 200 and await r.read() == first
    other = message(node, xid=wire.new_xid())  # another exchange claiming to be the retry: refused
    async with http.post(node.url + "/v1/gossip", data=other, headers={"Gossipfl-Retry": xid}) as r:
        assert r.status == 409 and f"a retry of exchange {xid}" in (await r.json())["error"]
    unknown = wire.new_xid()  # a retry of an exchange not prepared here: no room, as any other
    async with http.post(
        node.url + "/v1/gossip", data=message(node, xid=unknown), headers={"Gossipfl-Retry": unknown}
    ) as r:
        assert r.status == 409 and "no room" in (await r.json())["error"]
    async with http.post(node.url + "/v1/gossip", data=body, headers={"Gossipfl-Retry": "nope"}) as r:
        assert r.status == 400
    assert node.learner.merges == 0 and len(node.gossiper.ledger) == 1

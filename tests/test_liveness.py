"""Liveness under faults, in one process: peers that misbehave (hivemind-style ``Fault``s), loops whose
rounds fail, slow or vanishing clients. Each test names the defect it guards against."""

import asyncio
import logging
import time

import aiohttp
import numpy as np
import pytest

from gossipfl.common import httpio
from gossipfl.protocol import transport, wire
from gossipfl.protocol.consensus import flatten

from .faults import Fault, FaultProxy, Phase, faulty_peer, json_of, raw_request, read_response, status_of
from .helpers import message, params_of, running, settled, wait_for
from .tasks import BatchNormTask, BrokenTask, CountingTask, SlowEvalTask

pytestmark = pytest.mark.timeout(60)

NO_TRAIN = dict(no_train=True, discovery=("static",))


def committed(node) -> int:
    st = node.gossiper.stats
    return st.ok + st.served + st.late


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.value)
async def test_a_faulty_peer_does_not_stop_gossip_with_a_healthy_one(make_config, http, fault):
    """Defects 1 and 4: one bad answer (a non-UTF-8 error body ended the gossip task for good) or a peer that
    hangs must not stop a node from gossiping with its healthy peers, and moves no model."""
    async with running(make_config(seed=1, gossip_interval=0.1, **NO_TRAIN), make_config(seed=2, **NO_TRAIN)) as (
        a,
        b,
    ):
        valid = wire.encode(wire.GossipMessage("someone-else", 0, params_of(b), "digits", xid=wire.new_xid())).tobytes()
        async with faulty_peer(fault, valid) as (url, seen):
            total0 = flatten(params_of(a)) + flatten(params_of(b))
            a.peers.upsert("faulty", url, "digits", "static")
            a.peers.upsert(b.id, b.url, "digits", "static")
            assert await wait_for(lambda: "/v1/gossip" in seen, timeout=10)
            after_first = committed(a)
            # while the faulty peer fails (a hang takes the 2 s timeout), the node keeps exchanging with b
            # at its usual pace, about 10 a second here...
            assert await wait_for(lambda: committed(a) >= after_first + 10, 5), a.gossiper.stats
            # ...and tries the faulty peer again once its backoff has passed: nothing stopped the gossip
            assert await wait_for(lambda: seen.count("/v1/gossip") >= 2, 20), (seen, a.gossiper.stats)
            assert a.peers.get("faulty").failures >= 1 and a.gossiper.stats.failed >= 1
            assert a.status()["loops"]["gossip"]["errors"] == 0  # a failed exchange, not a crashed loop
            start = time.monotonic()
        await a.stop()
        await b.stop()
        assert time.monotonic() - start < 6  # stopping does not wait for the faulty peer
    np.testing.assert_allclose(flatten(params_of(a)) + flatten(params_of(b)), total0, rtol=0, atol=2e-6)


async def test_an_error_reply_that_is_not_utf8_is_logged_printably(make_config, http, caplog):
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (a,):
        async with faulty_peer(Fault.NON_UTF8_ERROR) as (url, _):
            a.peers.upsert("faulty", url, "digits", "static")
            with caplog.at_level(logging.INFO, logger="gossipfl"):
                assert await a.gossiper.exchange(http, a.peers.get("faulty")) == "failed"
    line = next(r.getMessage() for r in caplog.records if "exchange with faulty failed" in r.getMessage())
    assert "HTTP 500: \ufffd\ufffd\ufffd broken \ufffd\ufffd" in line


async def test_a_round_that_raises_is_counted_and_training_goes_on(make_config, http, caplog):
    """Defect 2: BatchNorm on 65 samples fails on the minibatch of one at the end of every epoch; the
    node used to stop training after 2 steps for good and still say it was training."""
    cfg = make_config(task="batchnorm", gossip_interval=1000, discovery=("static",), batch_size=32, steps_per_round=1)
    with caplog.at_level(logging.INFO, logger="gossipfl"):
        async with running(cfg, task=BatchNormTask(65)) as (node,):
            assert await wait_for(lambda: node.learner.steps >= 20, timeout=20)
            st = node.status()
            train = st["loops"]["train"]
            assert train["errors"] >= 3 and train["rounds"] >= 20 and train["running"]
            assert (
                "ValueError" in train["last_error"] and "Expected more than 1 value per channel" in train["last_error"]
            )
            assert st["training"] is True and st["failure"] is None and not node.failed.is_set()
            async with http.get(node.url + "/metrics") as r:
                text = await r.text()
            assert 'gossipfl_loop_errors_total{kind="ValueError",loop="train"}' in text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "Expected more than 1" in r.getMessage()]
    assert len(errors) == 1  # logged once, with its traceback; then counted


async def test_a_loop_that_cannot_go_on_stops_the_node_as_failed(make_config, http):
    cfg = make_config(task="broken", gossip_interval=1000, discovery=("static",))
    async with running(cfg, task=BrokenTask()) as (node,):
        assert await wait_for(node.failed.is_set, timeout=10)
        st = node.status()
        assert st["failure"].startswith("train failed 10 times in a row") and "always fails" in st["failure"]
        assert st["training"] is False and node.exit_code == 1
        async with http.get(node.url + "/metrics") as r:
            assert "gossipfl_failed 1.0" in await r.text()


async def test_a_hung_peer_does_not_block_inbound_exchanges(make_config, http):
    """Defect 4: an exchange waiting on a hung peer used to hold a busy flag for 10 s, refusing every
    inbound exchange meanwhile."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        async with faulty_peer(Fault.HANG) as (url, seen):
            node.peers.upsert("hung", url, "digits", "static")
            hung = asyncio.ensure_future(node.gossiper.exchange(http, node.peers.get("hung")))
            assert await wait_for(lambda: seen, timeout=5)
            for _ in range(3):  # three whole exchanges started by others while ours hangs
                xid = wire.new_xid()
                async with http.post(node.url + "/v1/gossip", data=message(node, xid=xid)) as r:
                    assert r.status == 200
                async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
                    assert (await r.json())["outcome"] == "committed"
                await wait_for(lambda: not node.gossiper._background, 5, interval=0.01)  # applied
            assert not hung.done()
            assert await hung == "failed"
        assert node.gossiper.stats.served == 3 and node.peers.get("hung").failures == 1


async def test_stop_cancels_an_exchange_stuck_on_a_peer(make_config, http):
    async with running(make_config(gossip_interval=0.05, **NO_TRAIN)) as (node,):
        node.gossiper.timeout = aiohttp.ClientTimeout(total=60)  # as for a big model on a slow link
        async with faulty_peer(Fault.HANG) as (url, seen):
            node.peers.upsert("hung", url, "digits", "static")
            assert await wait_for(lambda: node.gossiper.tasks, timeout=5)
            start = time.monotonic()
            await node.stop()
            assert time.monotonic() - start < 5
            assert not node.gossiper.tasks


async def test_inbound_exchanges_are_refused_before_their_body_is_read_when_there_is_no_room(make_config):
    """Defect 5: bodies were read before the busy check, with no deadline."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        room = node.gossiper.ledger.max_prepared
        head = (
            f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            f"Content-Length: {node.gossiper.max_body}\r\n\r\n"
        ).encode()
        # `room` uploads that never finish take every place...
        stalled = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(room)]
        for _, w in stalled:
            w.write(head + b"\x80" * 100)
            await w.drain()
        await wait_for(lambda: node.gossiper._receiving == room, timeout=5)
        # ...so the next one is answered 409 at once, its body unread
        start = time.monotonic()
        reply = await raw_request(node.port, head, b"\x80" * 10, timeout=5)
        assert status_of(reply) == 409 and "busy" in json_of(reply)["error"]
        assert time.monotonic() - start < 1.0
        # the stalled ones are cut off at their deadline with a 408, and the places are free again
        for r, w in stalled:
            data = await asyncio.wait_for(read_response(r), 10)
            assert status_of(data) == 408 and "not received within" in json_of(data)["error"]
            w.close()
        assert node.gossiper._receiving == 0
        reply = await raw_request(node.port, head.replace(str(node.gossiper.max_body).encode(), b"5"), b"\x80" * 5)
        assert status_of(reply) == 400  # room again: this one is read, and refused as malformed
        assert node.learner.merges == 0


async def test_clients_that_hang_up_mid_upload_are_not_errors(make_config, http, caplog):
    """Defect 10: 400 closed sockets wrote 7,263 log lines with tracebacks and took the 500 path."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        head = (f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: {node.gossiper.max_body}\r\n\r\n").encode()
        infer = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        with caplog.at_level(logging.DEBUG, logger="gossipfl"), caplog.at_level(logging.DEBUG, logger="aiohttp"):
            for i in range(50):
                await raw_request(node.port, head if i % 2 else infer, b"\x80" * 1000, read=False)
            await asyncio.sleep(0.5)
            async with http.get(node.url + "/v1/status") as r:
                assert r.status == 200
        bad = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        assert bad == [], [r.getMessage() for r in bad[:3]]
        assert node.gossiper._receiving == 0 and node.gossiper.stats.rejected == 0


async def test_many_slow_uploads_leave_the_node_responsive(make_config, http, caplog):
    """Defect 5: 1,100 slow uploads made /v1/status time out and wrote 242,000 log lines."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        head = f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: {node.gossiper.max_body}\r\n\r\n".encode()
        with caplog.at_level(logging.DEBUG, logger="gossipfl"):
            conns = []
            for _ in range(200):
                r, w = await asyncio.open_connection("127.0.0.1", node.port)
                w.write(head + b"\x80")
                conns.append((r, w))
            start = time.monotonic()
            async with http.get(node.url + "/v1/status") as resp:
                assert resp.status == 200
            assert time.monotonic() - start < 2.0
            codes = [status_of(await asyncio.wait_for(read_response(r), 10)) for r, _ in conns]
            for _, w in conns:
                w.close()
        assert set(codes) <= {408, 409} and codes.count(408) <= node.gossiper.ledger.max_prepared, codes
        assert len(caplog.records) < 20 + len(conns)  # at most about one line each, at debug level
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("request_bytes", "status", "fragment"),
    [
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 400, "more than 8190 bytes"),
        (
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            400,
            "Too many headers",
        ),
        (
            b"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnonsense\r\n",
            400,
            "chunk size",
        ),
        (b"NOT-HTTP at all\r\n\r\n", 400, "Bad Request"),
    ],
    ids=["huge header", "too many headers", "bad chunked body", "not http"],
)
async def test_http_parser_errors_answer_json(make_config, request_bytes, status, fragment):
    """Defect 10: aiohttp's own parser errors answered text/plain."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        reply = await raw_request(node.port, request_bytes)
    assert status_of(reply) == status, reply[:300]
    assert b"Content-Type: application/json" in reply.split(b"\r\n\r\n")[0]
    assert fragment in json_of(reply)["error"]


async def test_too_many_connections_are_refused_with_json(make_config, http):
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        node._runner.server.max_connections = 5
        conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(5)]
        reply = await raw_request(node.port, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(reply) == 503 and "too many connections" in json_of(reply)["error"]
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.2)
        async with http.get(node.url + "/v1/status") as r:
            assert r.status == 200


async def test_readiness_status_and_metrics_never_wait_for_the_learner(make_config, http):
    """Defect 7: /v2/health/ready took the learner's lock on the event loop; with a 2 s evaluation,
    /v1/status took 1.9 s while a probe polled."""
    cfg = make_config(task="slow-eval", gossip_interval=1000, discovery=("static",), eval_interval=0.1)
    async with running(cfg, task=SlowEvalTask(3.0)) as (node,):
        assert await wait_for(lambda: node.learner._lock.locked(), timeout=10)  # an evaluation holds it
        for path in ("/v2/health/ready", "/v1/status", "/metrics", "/v2/models/slow-eval/ready", "/v1/peers"):
            start = time.monotonic()
            async with http.get(node.url + path, timeout=aiohttp.ClientTimeout(total=2.5)) as r:
                assert r.status in (200, 400), path
            assert time.monotonic() - start < 0.5, path
        assert node.learner._lock.locked()


async def test_a_huge_age_cannot_stop_learning_or_make_a_node_unsendable(make_config, http):
    """Defect 6: one valid message with age 2**63-1 set the network's step size to 1e-17 and, one step
    later, made the node's own messages unreadable to everyone."""
    async with running(
        make_config(task="counting", gossip_interval=1000, discovery=("static",)), task=CountingTask()
    ) as (node,):
        assert await wait_for(lambda: node.learner.steps >= 5, timeout=10)
        import msgpack

        huge = msgpack.unpackb(message(node), raw=False)
        huge["age"] = 2**63 - 1
        async with http.post(node.url + "/v1/gossip", data=msgpack.packb(huge, use_bin_type=True)) as r:
            assert r.status == 400 and "2**53" in (await r.json())["error"]
        xid = wire.new_xid()
        async with http.post(node.url + "/v1/gossip", data=message(node, age=wire.MAX_AGE, xid=xid)) as r:
            assert r.status == 200
        age_before = node.learner.age
        async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == "committed"
        await settled(node)
        assert node.learner.merges == 1
        assert node.learner.age <= age_before + 10_000 + 100  # one claim adds at most 10,000 steps
        lr = node.learner.lr_at(node.learner.steps)
        assert lr == pytest.approx(node.learner.lr / (1 + node.learner.steps / node.learner.lr_decay_steps))
        steps = node.learner.steps
        assert await wait_for(lambda: node.learner.steps >= steps + 5, timeout=10)  # still training
        async with http.get(node.url + "/v1/model") as r:
            wire.decode(await r.read(), node.gossiper.spec)  # and its messages are still valid


async def test_batchnorm_running_statistics_are_gossiped(make_config, http):
    """Defect 8: only parameters travelled; BatchNorm's running statistics stayed local though the served
    model file includes them. Float buffers are averaged like parameters; the batch counter stays local."""
    cfg = dict(task="batchnorm", no_train=True, gossip_interval=1000, discovery=("static",))
    async with running(make_config(seed=1, **cfg), make_config(seed=2, **cfg), task=BatchNormTask(128)) as (a, b):
        assert {"1.running_mean", "1.running_var"} <= set(a.gossiper.spec)
        assert "1.num_batches_tracked" not in a.gossiper.spec
        with a.learner._lock:
            a.learner.model[1].running_mean.fill_(2.0)
            a.learner.model[1].num_batches_tracked.fill_(7)
        with b.learner._lock:
            b.learner.model[1].running_mean.fill_(4.0)
        b.peers.upsert(a.id, a.url, "batchnorm", "static")
        assert await b.gossiper.exchange(http, b.peers.get(a.id)) == "ok"
        await settled(a, b)
        for node, batches in ((a, 7), (b, 0)):
            bn = node.learner.model[1]
            assert bn.running_mean.tolist() == [3.0] * 8
            assert int(bn.num_batches_tracked) == batches
            state, _ = node.learner.served_state()
            assert state["1.running_mean"].tolist() == [3.0] * 8  # and the served file has them


async def test_local_steps_during_an_exchange_are_kept(make_config, http):
    """The rebase: steps a node takes while its exchange is on the network are added to the merge, not
    lost and not counted twice. Each step adds exactly 1 to every weight, so the weights count steps."""
    trainer = make_config(task="counting", gossip_interval=1000, discovery=("static",), train_interval=0.01)
    still = make_config(task="counting", gossip_interval=1000, discovery=("static",), no_train=True)
    async with running(trainer, still, task=CountingTask()) as (a, b):
        proxy = FaultProxy(b.url, hold=0.5)
        proxy.plan["prepare"] = [Phase.DELAY]  # the prepare reaches b late: a trains meanwhile
        async with proxy.running() as via:
            a.gossiper.timeout = aiohttp.ClientTimeout(total=5)
            a.peers.upsert(b.id, via, "counting", "static")
            steps0 = a.learner.steps
            assert await a.gossiper.exchange(http, a.peers.get(b.id)) == "ok"
        await settled(a, b)
        with a.learner._lock:
            steps, w_a = a.learner.steps, float(a.learner.model.w[0].detach())
        w_b = float(params_of(b)["w"][0])
        sent = 2 * w_b  # b averaged a's state as sent (its weight = a's steps then) with its own zero
        assert steps - sent >= 5  # a really trained while the exchange was in flight...
        assert sent >= steps0
        assert w_a == w_b + (steps - sent)  # ...and kept exactly those steps on top of the merge


async def test_inference_uploads_are_capped_and_a_broken_model_is_not_sent(make_config, http):
    """Defect 5: bodies of any route were read with no limit on how many at once. And a model that is
    not finite is not sent on /v1/model (the node would send what its peers refuse): 503."""
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        stalled = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(8)]
        for _, w in stalled:
            w.write(head + b"{")
            await w.drain()
        assert await wait_for(node.inference_uploads.locked, timeout=5)
        reply = await raw_request(node.port, head, b"{")
        assert status_of(reply) == 503 and b"Retry-After: 1" in reply and "retry" in json_of(reply)["error"]
        for _, w in stalled:
            w.close()
        assert await wait_for(lambda: not node.inference_uploads.locked(), timeout=5)
        node.learner.update(lambda s: ({k: np.full_like(v, np.nan) for k, v in s.params.items()}, s.age, s.weight))
        async with http.get(node.url + "/v1/model") as r:
            assert r.status == 503 and "cannot be sent" in (await r.json())["error"]
        valid = message(node, {k: np.zeros_like(v) for k, v in params_of(node).items()})
        async with http.post(node.url + "/v1/gossip", data=valid) as r:  # not the sender's fault: 503
            assert r.status == 503 and "model cannot be sent" in (await r.json())["error"]
        assert node.gossiper.stats.rejected == 0 and len(node.gossiper.ledger) == 0


async def test_a_peer_that_stalls_mid_stream_is_cut_off_long_before_the_deadline(make_config, http, monkeypatch):
    """Large bodies get long deadlines (2 s + 2 s per 8 MB each way); a sender that stops sending is cut off
    once nothing came for STALL_S, on both ends, while the node serves everything else. The deadlines are
    stretched here to minutes (as for a model of gigabytes) and STALL_S cut to half a second."""
    monkeypatch.setattr(transport, "MIN_THROUGHPUT", 1e3)  # deadlines of 40 s and more for a digits model
    monkeypatch.setattr(httpio, "STALL_S", 0.5)
    async with running(make_config(gossip_interval=1000, **NO_TRAIN)) as (node,):
        assert node.gossiper.request_timeout > 40 and node.gossiper.timeout.sock_read == 0.5
        # inbound: half a body, then silence
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: {node.gossiper.max_body}\r\n\r\n".encode())
        w.write(b"\x80" * (node.gossiper.max_body // 2))
        start = time.monotonic()
        async with http.get(node.url + "/v1/status") as resp:  # answered meanwhile
            assert resp.status == 200
        answer = await asyncio.wait_for(read_response(r), 20)
        w.close()
        assert status_of(answer) == 408 and b"stalled: no data for 0.5 s" in answer
        assert time.monotonic() - start < 10  # not the 40 s deadline
        # outbound: a peer whose reply stops halfway
        async with faulty_peer(Fault.STALL_MID_BODY) as (url, seen):
            node.peers.upsert("staller", url, "digits", "static")
            start = time.monotonic()
            assert await node.gossiper.exchange(http, node.peers.get("staller")) == "failed"
            assert time.monotonic() - start < 10 and seen.count("/v1/gossip") >= 1


async def test_a_slow_evaluation_is_paced_to_a_tenth_of_the_time(make_config):
    """An evaluation holds the model's lock (exchanges and inference wait for it): on a large model, one
    evaluation per --eval-interval would take all of a node's time. A 0.3 s evaluation asked for every 0.1 s
    runs about every 3 s instead."""
    cfg = make_config(task="slow-eval", gossip_interval=1000, discovery=("static",), eval_interval=0.1)
    async with running(cfg, task=SlowEvalTask(0.3)) as (node,):
        assert await wait_for(lambda: node.status()["loops"]["eval"]["rounds"] >= 1, timeout=10)
        first = node.status()["loops"]["eval"]["rounds"]
        await asyncio.sleep(6.5)
        assert node.status()["loops"]["eval"]["rounds"] - first in (1, 2, 3)  # not ~16 (0.3 s + 0.1 s each)
        assert node._eval_cost == pytest.approx(0.3, abs=0.25)

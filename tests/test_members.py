"""Members only, over real HTTP on loopback: the cluster key on every node-to-node request and reply, the read
token, the allow-list; every refusal is 401 and leaves the model unchanged and the node serving."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
from aiohttp import web

from gossipfl.protocol import wire
from gossipfl.security.signing import HEADER, ClusterKey

from .helpers import message, params_of, running, wait_for

KEY = bytes(range(32, 64))
OTHER_KEY = bytes(range(64, 96))
TOKEN = "read-token-123"
READ_ROUTES = ["/v1/model", "/v1/status", "/v1/peers", "/metrics", "/v1/openapi.json", "/v2", "/v2/models/digits"]


def write_key(path, key: bytes) -> str:
    path.write_bytes(key)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "cluster.key", KEY)


@pytest.fixture
def other_key_file(tmp_path):
    return write_key(tmp_path / "other.key", OTHER_KEY)


def listed(node, who: str) -> list[dict]:
    """``node``'s ignored peers that announced themselves as ``who``: listed under their address, with the
    id they announced (unproven) in the reason."""
    return [p for p in node.status()["ignored_peers"] if f"announced as {who!r}" in p["reason"]]


def signed_headers(
    target: str, body: bytes = b"", *, key: bytes = KEY, sender: str = "tester", method: str = "POST", to: str = "n0"
):
    header, nonce = ClusterKey(key).sign_request(method, target, sender, to, body)
    return {HEADER: header, "Content-Type": wire.CONTENT_TYPE}, nonce


def unchanged(node, before) -> bool:
    now = params_of(node)
    return node.learner.merges == 0 and all(np.array_equal(now[k], before[k]) for k in before)


async def test_read_token_guards_every_read_route_but_health(make_config, key_file, http):
    cfg = make_config(id="n0", no_train=True, secret_file=key_file, read_token=TOKEN)
    async with running(cfg) as (node,):
        for path in READ_ROUTES:
            async with http.get(node.url + path) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "error" in await r.json() and TOKEN not in await r.text()
            async with http.get(node.url + path, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401, path
            async with http.get(node.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200, path
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with http.get(node.url + path) as r:
                assert r.status in (200, 400), path  # ready is 400 until the model is trained or merged: not 401
        async with http.get(node.url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            security = (await r.json())["security"]
        assert security == {
            "mode": "cluster-key",
            "scheme": "http",
            "read_token": True,
            "allow_ids": None,
            "refused": {"read": len(READ_ROUTES) * 2},
        }


async def test_a_valid_but_unsigned_gossip_message_is_refused_and_merges_nothing(make_config, key_file, http, caplog):
    cfg = make_config(id="n0", no_train=True, secret_file=key_file, read_token=TOKEN)
    async with running(cfg) as (node,):
        before = params_of(node)
        body = message(node, sender="tester")
        caplog.set_level(logging.DEBUG)
        attempts = [
            {"Content-Type": wire.CONTENT_TYPE},  # unsigned
            {"Content-Type": wire.CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"},  # a read token is not a key
            {"Content-Type": wire.CONTENT_TYPE, HEADER: "v1 garbage"},  # malformed
            signed_headers("/v1/gossip", body, key=OTHER_KEY)[0],  # another cluster's key
            signed_headers("/v1/gossip", b"another body")[0],  # signed for another body
            signed_headers("/v1/gossip/" + "0" * 32 + "/commit", body)[0],  # signed for another path
            signed_headers("/v1/gossip", body, sender="someone-else")[0],  # a member speaking as another
            signed_headers("/v1/gossip", body, to="n1")[0],  # a request meant for another node (replayed here)
            signed_headers("/v1/gossip", body, to="")[0],  # a gossip message must name its recipient
        ]
        for headers in attempts:
            async with http.post(node.url + "/v1/gossip", data=body, headers=headers) as r:
                assert r.status == 401, headers
                assert HEADER not in r.headers  # a refusal is never signed
        xid = "0" * 32
        async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
            assert r.status == 401
        await asyncio.sleep(0.3)
        assert unchanged(node, before) and node.gossiper.stats.served == 0
        assert node.metrics is not None
        async with http.get(node.url + "/v2/health/live") as r:
            assert r.status == 200  # still serving
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert KEY.hex() not in log and TOKEN not in log and "sig=" not in log


async def test_a_signed_exchange_is_answered_with_a_signed_reply_and_cannot_be_replayed(make_config, key_file, http):
    cfg = make_config(id="n0", no_train=True, secret_file=key_file)
    async with running(cfg) as (node,):
        before = params_of(node)
        body = message(node, sender="tester")
        headers, nonce = signed_headers("/v1/gossip", body)
        async with http.post(node.url + "/v1/gossip", data=body, headers=headers) as r:
            assert r.status == 200
            reply = await r.read()
            assert (
                ClusterKey(KEY).verify_reply(r.headers.get(HEADER), 200, "POST", "/v1/gossip", nonce, reply) == node.id
            )
        async with http.post(node.url + "/v1/gossip", data=body, headers=headers) as r:  # the same request again
            assert r.status == 401 and "replay" in (await r.json())["error"]
        stale, _ = ClusterKey(KEY, clock=lambda: __import__("time").time() - 60).sign_request(
            "POST", "/v1/gossip", "tester", "n0", body
        )
        async with http.post(node.url + "/v1/gossip", data=body, headers={HEADER: stale}) as r:
            assert r.status == 401 and "timestamp" in (await r.json())["error"]
        assert unchanged(node, before)  # prepared, never committed
        # a node-to-node read, signed: answered (no read token set) and signed back
        h, nonce = signed_headers("/v1/status", method="GET")
        async with http.get(node.url + "/v1/status", headers=h) as r:
            raw = await r.read()
            assert ClusterKey(KEY).verify_reply(r.headers.get(HEADER), 200, "GET", "/v1/status", nonce, raw) == node.id


async def rogue_node(port_holder: list[int], reply: bytes, status: dict, *, sign_with: bytes | None) -> web.AppRunner:
    """An HTTP server that looks like a node (its status matches) and answers every gossip with ``reply``,
    unsigned or signed with another key: what a rogue announced over mDNS would do."""

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status)

    async def post_gossip(request: web.Request) -> web.Response:
        await request.read()
        headers = {}
        if sign_with is not None:
            headers[HEADER] = ClusterKey(sign_with).sign_reply(200, "POST", "/v1/gossip", "0" * 32, status["id"], reply)
        return web.Response(body=reply, content_type=wire.CONTENT_TYPE, headers=headers)

    async def post_decision(request: web.Request) -> web.Response:
        return web.json_response({"xid": request.match_info["xid"], "outcome": "committed"})

    app = web.Application()
    app.router.add_get("/v1/status", get_status)
    app.router.add_post("/v1/gossip", post_gossip)
    app.router.add_post("/v1/gossip/{xid}/{decision}", post_decision)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_holder.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    return runner


@pytest.mark.parametrize("sign_with", [None, OTHER_KEY], ids=["unsigned", "other-key"])
async def test_a_forged_reply_is_not_merged_and_its_sender_is_ignored(make_config, key_file, sign_with):
    cfg = make_config(id="n0", no_train=True, secret_file=key_file, gossip_interval=0.05)
    async with running(cfg) as (node,):
        before = params_of(node)
        poison = {k: np.full_like(v, 1e3) for k, v in before.items()}
        state = node.learner.snapshot()
        status = {"id": "rogue", "task": node.task.name, "cluster": node.config.cluster, "protocol": 2}
        port: list[int] = []
        # the rogue's reply would pass every other check: right task, shape, cluster, sender
        reply = wire.encode(
            wire.GossipMessage(
                "rogue", state.age + 100, poison, node.task.name, "average", 10, 1.0, node.config.cluster, None, None
            )
        ).tobytes()
        runner = await rogue_node(port, reply, status, sign_with=sign_with)
        try:
            node.peers.upsert("rogue", f"http://127.0.0.1:{port[0]}", node.task.name, "mdns")
            assert await wait_for(lambda: node.gossiper.stats.unauthorized > 0, timeout=5)
            ignored = {p["id"]: p["reason"] for p in node.status()["ignored_peers"]}
            assert "rogue" in ignored and ignored["rogue"].startswith("authentication:")
            assert "rogue" not in node.peers
            # discovery cannot put it straight back (no tight retry loop)
            assert not node.peers.upsert("rogue", f"http://127.0.0.1:{port[0]}", node.task.name, "mdns")
            assert unchanged(node, before) and node.gossiper.stats.ok == 0
            # a probe of it (seeds, DNS, peer exchange) refuses it too: its status reply is not signed by the key
            assert await node.discovery.prober.probe(f"http://127.0.0.1:{port[0]}", "static") == "ignored"
        finally:
            await runner.cleanup()


async def test_allow_ids_limits_who_may_gossip(make_config, key_file, http):
    cfg = make_config(id="n0", no_train=True, secret_file=key_file, allow_ids=("friend",))
    async with running(cfg) as (node,):
        before = params_of(node)
        for sender, expected in (("stranger", 401), ("friend", 200)):
            body = message(node, sender=sender)
            headers, _ = signed_headers("/v1/gossip", body, sender=sender)
            async with http.post(node.url + "/v1/gossip", data=body, headers=headers) as r:
                assert r.status == expected, sender
        assert unchanged(node, before)


async def cluster_converges(nodes, timeout: float) -> bool:
    def close() -> bool:
        accs = [n.last_eval.accuracy if n.last_eval else 0.0 for n in nodes]
        return min(accs) > 0.85 and all(n.learner.merges > 0 for n in nodes)

    return await wait_for(close, timeout=timeout, interval=0.5)


async def test_four_members_converge_and_an_outsider_is_refused_by_all(
    make_config, zc, key_file, other_key_file, cluster
):
    # ids of this test's own: ids are mDNS instance names, shared by tests running at once (test_mtls: m0..m3)
    ids = [f"m{i}-{cluster[-6:]}" for i in range(4)]
    members = [
        make_config(id=ids[i], discovery=("mdns",), partition=f"{i}/4", seed=i, secret_file=key_file) for i in range(4)
    ]
    outsider = make_config(  # it can join nobody: it waits a second for peers, then trains alone
        id=f"outsider-{cluster[-6:]}",
        discovery=("mdns",),
        partition="0/4",
        seed=9,
        secret_file=other_key_file,
        join_wait=1,
    )
    async with running(*members, outsider, zeroconf=zc) as nodes:
        inside, out = nodes[:4], nodes[4]
        out_before = params_of(out)
        assert await cluster_converges(inside, timeout=60)

        assert await wait_for(lambda: all(listed(n, out.id) for n in inside), timeout=20)
        for n in inside:
            (entry,) = listed(n, out.id)
            assert entry["reason"].startswith("authentication") and entry["url"] == out.url, entry
        # the outsider learned nothing from them and changed none of them
        assert out.learner.merges == 0 and out.gossiper.stats.ok == 0 and out.gossiper.stats.served == 0
        assert all(listed(out, i) for i in ids)
        assert all(n.id not in {p.id for p in out.peers.all()} for n in inside)
        assert not all(np.array_equal(params_of(out)[k], v) for k, v in out_before.items())  # it trains alone


async def test_a_non_member_is_refused_before_its_body_is_read_or_room_reserved(make_config, key_file):
    """A well-formed header with a made-up signature and a large declared body: the answer comes at once, from
    the head alone, and the node's exchange slots stay free for members."""
    from .faults import raw_request, status_of

    async with running(make_config(id="n0", no_train=True, secret_file=key_file)) as (node,):
        fake = f"v1 id=x,to=n0,ts={int(time.time())},nonce={'0' * 32},hsig={'1' * 64},sig={'2' * 64}"
        head = (
            f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\n{HEADER}: {fake}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {node.gossiper.max_body}\r\n\r\n"
        ).encode()
        start = time.monotonic()
        reply = await raw_request(node.port, head, b"", timeout=5)  # no body is ever sent
        assert status_of(reply) == 401 and time.monotonic() - start < 2
        assert node.gossiper._receiving == 0 and len(node.gossiper.ledger) == 0


async def test_only_the_member_that_prepared_an_exchange_decides_it(make_config, key_file, http):
    async with running(make_config(id="n0", no_train=True, secret_file=key_file)) as (node,):
        xid = wire.new_xid()
        body = message(node, sender="alice", xid=xid)
        async with http.post(
            node.url + "/v1/gossip", data=body, headers=signed_headers("/v1/gossip", body, sender="alice")[0]
        ) as r:
            assert r.status == 200
        path = f"/v1/gossip/{xid}/commit"
        async with http.post(node.url + path, headers=signed_headers(path, sender="mallory")[0]) as r:
            assert r.status == 401 and "another member" in (await r.json())["error"]
        async with http.post(node.url + path, headers=signed_headers(path, sender="alice")[0]) as r:
            assert (await r.json())["outcome"] == "committed"


async def test_an_mdns_record_claiming_a_members_id_gets_the_impostor_shunned_not_the_member(
    make_config, zc, key_file, caplog
):
    """A non-member announces the id of an honest member at its own address: the members probe it before
    believing it, shun that address, and keep gossiping with the real member."""
    import socket as _socket

    from zeroconf.asyncio import AsyncServiceInfo

    from gossipfl.discovery.mdns import SERVICE_TYPE

    a_cfg = make_config(id="ma", discovery=("mdns",), no_train=True, seed=1, secret_file=key_file)
    b_cfg = make_config(id="mb", discovery=("mdns",), no_train=True, seed=2, secret_file=key_file)

    async def refuse_all(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse_all)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with running(a_cfg, b_cfg, zeroconf=zc) as (a, b):
            assert await wait_for(lambda: a.peers.get("mb") is not None and a.gossiper.stats.ok > 0, timeout=15)
            props = dict(b.discovery.mdns.info.properties)
            fake = AsyncServiceInfo(
                SERVICE_TYPE, f"impostor.{SERVICE_TYPE}", addresses=[_socket.inet_aton("127.0.0.1")], port=port,
                properties=props, server="impostor.local.",
            )  # fmt: skip
            await (await zc.async_register_service(fake))
            rogue = f"http://127.0.0.1:{port}"
            try:
                assert await wait_for(lambda: a.peers.shunned(rogue), timeout=10)
                assert a.peers.get("mb").url == b.url
                ok = a.gossiper.stats.ok
                assert await wait_for(lambda: a.gossiper.stats.ok > ok + 3, timeout=10)  # still gossiping with mb
                # a record at the member's own address with a field that does not match cannot remove it either
                bad = {**props, b"proto": b"1"}
                spoof = AsyncServiceInfo(
                    SERVICE_TYPE, f"spoof.{SERVICE_TYPE}", addresses=[_socket.inet_aton("127.0.0.1")], port=b.port,
                    properties=bad, server="spoof.local.",
                )  # fmt: skip
                caplog.set_level(logging.DEBUG)
                await (await zc.async_register_service(spoof))
                for _ in range(250):  # never gone, not even until its next call brings it back
                    assert a.peers.get("mb") is not None and a.peers.get("mb").url == b.url
                    assert "mb" not in {p["id"] for p in a.status()["ignored_peers"]}
                    await asyncio.sleep(0.02)
                assert any("announced as mb" in r.getMessage() for r in caplog.records)  # the record was seen
                await zc.async_unregister_service(spoof)
                ignored = {p["url"]: p for p in a.status()["ignored_peers"]}
                assert ignored[rogue]["reason"].startswith("authentication (announced as 'mb'):")
                assert "mb" not in {p["id"] for p in a.status()["ignored_peers"]}  # the member is not listed
            finally:
                await zc.async_unregister_service(fake)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("codec", ["none", "int8"])
async def test_members_exchange_models_of_megabytes_signed_piece_by_piece(make_config, key_file, http, codec):
    """Bodies over 1 MB are signed and checked (SHA-256 over their pieces, never joined) in a worker thread,
    on both sides, request and reply."""
    common = dict(task="synthetic:mb=3", no_train=True, gossip_interval=1000, secret_file=key_file, join_wait=0)
    async with running(make_config(id="big-a", seed=1, **common)) as (a,):
        async with running(
            make_config(id="big-b", seed=2, seeds=(f"127.0.0.1:{a.port}",), compress=codec, **common)
        ) as (b,):
            assert await wait_for(lambda: "big-a" in b.peers, timeout=10)
            assert await b.gossiper.exchange(http, b.peers.get("big-a")) == "ok"
            assert b.gossiper.stats.bytes_sent > (3 << 20) * (0.9 if codec == "none" else 0.25)

"""Mutual TLS over real HTTPS on loopback: certificates made by ``gossipfl certs``, node ids bound to them,
and a node of another CA refused by every member."""

from __future__ import annotations

import asyncio
import os
import ssl

import aiohttp
import numpy as np
import pytest

from gossipfl.cli import main
from gossipfl.node import Node, StartError
from gossipfl.protocol import wire
from gossipfl.security.tls import TlsFiles, client_context

from .helpers import message, params_of, running, wait_for
from .test_members import cluster_converges, listed, unchanged


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two cluster CAs: ``good`` with certificates for m0..m3, n-a and n-b; ``other`` with one for "intruder"."""
    root = tmp_path_factory.mktemp("pki")
    good, other = root / "good", root / "other"
    assert main(["certs", "init", str(good)]) == 0 and main(["certs", "init", str(other)]) == 0
    for node_id in ("m0", "m1", "m2", "m3", "n-a", "n-b"):
        assert main(["certs", "issue", str(good), node_id]) == 0
    assert main(["certs", "issue", str(other), "intruder"]) == 0
    return good, other


def tls(folder, node_id: str) -> dict[str, str]:
    return {"tls_cert": f"{folder}/{node_id}.crt", "tls_key": f"{folder}/{node_id}.key", "tls_ca": f"{folder}/ca.crt"}


def test_certs_are_written_once_with_private_keys_kept_private(pki, capsys):
    good, _ = pki
    assert oct(os.stat(good / "ca.key").st_mode & 0o777) == "0o600"
    assert oct(os.stat(good / "m0.key").st_mode & 0o777) == "0o600"
    assert main(["certs", "issue", str(good), "m0"]) == 2  # never overwrites
    assert main(["certs", "issue", str(good), "Node-A"]) == 2  # TLS compares ids without regard to case
    assert main(["certs", "issue", str(good / "nowhere"), "x"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("gossipfl: error: ") for e in errors)
    assert "already exists" in errors[0] and "Node-A" in errors[1] and "certs init" in errors[2]


async def test_four_tls_members_converge_and_a_node_of_another_ca_is_refused_by_all(make_config, zc, pki):
    good, other = pki
    members = [
        make_config(id=None, discovery=("mdns",), partition=f"{i}/4", seed=i, **tls(good, f"m{i}")) for i in range(4)
    ]
    intruder = make_config(id=None, discovery=("mdns",), partition="0/4", seed=9, **tls(other, "intruder"))
    async with running(*members, intruder, zeroconf=zc) as nodes:
        inside, out = nodes[:4], nodes[4]
        assert [n.id for n in nodes] == ["m0", "m1", "m2", "m3", "intruder"]  # ids from the certificates
        assert all(n.url.startswith("https://") for n in nodes)
        assert await cluster_converges(inside, timeout=60)

        assert await wait_for(lambda: all(listed(n, "intruder") for n in inside), timeout=20)
        for n in inside:
            (entry,) = listed(n, "intruder")
            assert "TLS handshake failed" in entry["reason"] and entry["url"] == out.url, entry
            assert n.status()["security"]["mode"] == "mutual-tls"
        assert out.learner.merges == 0 and out.gossiper.stats.ok == 0 and out.gossiper.stats.served == 0
        assert all(listed(out, f"m{i}") for i in range(4))


async def test_without_a_client_certificate_gossip_is_refused_and_reads_follow_the_token(make_config, pki):
    good, _ = pki
    async with running(make_config(id=None, no_train=True, **tls(good, "n-a"))) as (node,):
        before = params_of(node)
        ctx = ssl.create_default_context(cafile=str(good / "ca.crt"))
        ctx.check_hostname = False  # the certificate names the node id, not 127.0.0.1
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as anon:
            body = message(node, sender="n-b")
            async with anon.post(node.url + "/v1/gossip", data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as r:
                assert r.status == 401 and "client certificate" in (await r.json())["error"]
            async with anon.get(node.url + "/v2/health/live") as r:
                assert r.status == 200  # still serving; no read token set, so reads are open
            async with anon.get(node.url + "/v1/status") as r:
                assert r.status == 200
        # plain HTTP to an HTTPS node: no answer it could take for a model
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(node.url.replace("https", "http") + "/v1/status") as r:
                    await r.read()
        assert unchanged(node, before)


async def test_a_member_cannot_speak_as_another(make_config, pki):
    good, _ = pki
    async with running(make_config(id=None, no_train=True, **tls(good, "n-a"))) as (node,):
        before = params_of(node)
        ctx = client_context(
            TlsFiles(**{k.removeprefix("tls_"): v for k, v in tls(good, "n-b").items()}), check_id=False
        )
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as member:
            for sender, expected in (("m0", 401), ("n-b", 200)):  # certified as n-b, claiming m0, then itself
                body = message(node, sender=sender)
                async with member.post(
                    node.url + "/v1/gossip", data=body, headers={"Content-Type": wire.CONTENT_TYPE}
                ) as r:
                    assert r.status == expected, (sender, await r.text())
        assert unchanged(node, before)


async def test_a_peer_whose_certificate_names_another_id_is_ignored(make_config, pki):
    good, _ = pki
    a_cfg = make_config(id=None, no_train=True, gossip_interval=0.05, **tls(good, "n-a"))
    b_cfg = make_config(id=None, no_train=True, **tls(good, "n-b"))
    async with running(a_cfg, b_cfg) as (a, b):
        before = params_of(a)
        a.peers.upsert("m3", b.url, a.task.name, "mdns")  # someone says m3 lives at b's address
        assert await wait_for(lambda: a.gossiper.stats.unauthorized > 0, timeout=5)
        reason = {p["id"]: p["reason"] for p in a.status()["ignored_peers"]}["m3"]
        assert reason.startswith("authentication: TLS handshake failed") and "not valid for 'm3'" in reason, reason
        assert unchanged(a, before) and b.gossiper.stats.served == 0


async def test_key_and_tls_together(make_config, pki, tmp_path):
    good, _ = pki
    key = tmp_path / "k"
    key.write_bytes(os.urandom(16).hex().encode())
    a_cfg = make_config(id=None, no_train=True, seed=1, secret_file=str(key), **tls(good, "n-a"))
    b_cfg = make_config(id=None, no_train=True, seed=2, secret_file=str(key), **tls(good, "n-b"))
    async with running(a_cfg, b_cfg) as (a, b):
        before = params_of(a)
        a.peers.upsert(b.id, b.url, b.task.name, "static")
        assert await wait_for(lambda: a.gossiper.stats.ok > 0, timeout=10)
        assert not np.array_equal(params_of(a)[next(iter(before))], before[next(iter(before))])
        assert a.status()["security"]["mode"] == "cluster-key+mutual-tls"


async def test_unusable_certificates_and_mismatched_ids_stop_the_start_with_one_line(make_config, pki, tmp_path):
    good, other = pki
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (dict(id="someone-else", **tls(good, "n-a")), "is for 'n-a'"),
        ({**tls(good, "n-a"), "tls_cert": str(tmp_path / "missing.crt")}, "missing.crt"),
        ({**tls(good, "n-a"), "tls_cert": str(junk)}, "junk.pem"),
        ({**tls(good, "n-a"), "tls_ca": str(junk)}, "junk.pem"),
        ({**tls(good, "n-a"), "tls_key": f"{good}/n-b.key"}, "cannot be used together"),
        (dict(id="x", secret_file=str(tmp_path / "nokey")), "nokey"),
    ]
    for overrides, expected in cases:
        cfg = make_config(no_train=True, **{"id": None, **overrides})
        with pytest.raises(StartError) as e:
            await Node(cfg).start()
        assert expected in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))


async def test_a_probed_node_whose_status_names_another_id_than_its_certificate_is_ignored(make_config, pki):
    """Discovery knows only an address: the status a member answers names its id, and the node must hold the
    certificate of that id (else any member could enter another's id into the peer table)."""
    from aiohttp import web

    from gossipfl.security.tls import server_context

    good, _ = pki
    async with running(make_config(id=None, no_train=True, **tls(good, "n-a"))) as (node,):

        async def status(request: web.Request) -> web.Response:
            return web.json_response({"id": "m3", "task": node.task.name, "cluster": node.config.cluster})

        async def live(request: web.Request) -> web.Response:
            return web.json_response({"live": True})

        app = web.Application()
        app.router.add_get("/v1/status", status)
        app.router.add_get("/v2/health/live", live)
        runner = web.AppRunner(app)
        await runner.setup()
        files = TlsFiles(**{k.removeprefix("tls_"): v for k, v in tls(good, "n-b").items()})
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(files))
        await site.start()
        url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        try:
            assert await node.discovery.prober.probe(url, "static") == "ignored"
            reason = {p["id"]: p["reason"] for p in node.status()["ignored_peers"]}[url]
            assert "not valid for 'm3'" in reason and "m3" not in node.peers
            assert await node.discovery.prober.probe(url, "static") == "ignored"  # not probed again for a while
        finally:
            await runner.cleanup()


async def test_the_cli_reads_an_https_node_with_the_cluster_ca(make_config, pki, tmp_path):
    good, _ = pki
    async with running(make_config(id=None, no_train=True, **tls(good, "n-a"))) as (node,):
        out = tmp_path / "m.safetensors"
        rc = await asyncio.to_thread(main, ["pull", node.url, "-o", str(out), "--cacert", str(good / "ca.crt")])
        assert rc == 0 and out.stat().st_size > 10_000
        other = tmp_path / "other.safetensors"  # without the CA, the node's certificate is not trusted
        assert await asyncio.to_thread(main, ["pull", node.url, "-o", str(other)]) == 1 and not other.exists()

"""Secure group averaging (--secure-group K, pairwise masks of Bonawitz et al. 2017): the arithmetic alone,
what a member's masked model looks like to the others, and real nodes over loopback HTTP with a cluster key:
consensus with the mean conserved, bad messages refused with every model unchanged, a member that drops out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re

import aiohttp
import msgpack
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from scipy import stats

from gossipfl.config import ConfigError
from gossipfl.discovery.peers import Peer
from gossipfl.node import StartError
from gossipfl.protocol import groupwire
from gossipfl.protocol.consensus import flatten
from gossipfl.protocol.group import GROUP_ONLY
from gossipfl.protocol.wire import WireError
from gossipfl.security import masking
from gossipfl.security.keybinding import KeyBinder, Proof
from gossipfl.security.signing import HEADER, ClusterKey
from gossipfl.security.tls import TlsFiles, client_context

from .helpers import message, params_of, running, spread, wait_for

pytestmark = pytest.mark.timeout(60)

KEY = bytes(range(32, 64))
OTHER_KEY = bytes(range(64, 96))
ROUND = bytes(range(16))
TOKEN = "operator-read-token"


def fixed_keys(k: int) -> list[X25519PrivateKey]:
    return [X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(k)]


def masked_all(models: list[np.ndarray], members: list[str] | None = None) -> list[np.ndarray]:
    """Every member's masked vector for ``models`` (fixed keys and round id: deterministic)."""
    k = len(models)
    members = members or [f"m{i}" for i in range(k)]
    keys = fixed_keys(k)
    pubs = [masking.public_bytes(s) for s in keys]
    return [masking.masked_vector(masking.encode(models[i]), keys[i], pubs, ROUND, members, i) for i in range(k)]


# -- the arithmetic ---------------------------------------------------------------------------------------------
def test_fixed_point_round_trip_and_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 5000), rng.uniform(-masking.RANGE, masking.RANGE, 1000)])
    x = np.concatenate([x, [masking.RANGE, -masking.RANGE, 0.0, 2.0**-40]])
    back = masking.decode_sum(masking.encode(x))
    assert np.max(np.abs(back - x)) <= 2.0 ** -(masking.SCALE_BITS + 1)  # one rounding, to the nearest 2**-32
    for bad in (masking.RANGE * (1 + 1e-9), -masking.RANGE - 1, np.nan, np.inf):
        with pytest.raises(masking.OutOfRange):
            masking.encode(np.array([0.0, bad]))


def test_masks_cancel_exactly_and_the_sum_is_the_plain_sum():
    rng = np.random.default_rng(1)
    for k in (3, 4, 7):
        models = [rng.normal(0, 1, 3001).astype(np.float32) for _ in range(k)]
        masked = masked_all(models)
        assert all(not np.array_equal(m, masking.encode(x)) for m, x in zip(masked, models, strict=True))
        total = masking.add(masked)
        np.testing.assert_array_equal(total, masking.add(masking.encode(x) for x in models))  # bit for bit
        plain = np.sum([x.astype(np.float64) for x in models], axis=0)
        assert np.max(np.abs(masking.decode_sum(total) - plain)) <= k * 2.0 ** -(masking.SCALE_BITS + 1)
        assert np.max(np.abs(masking.decode_mean(total, k) - plain / k)) <= 2.0 ** -(masking.SCALE_BITS + 1)


def test_no_overflow_at_the_edges_of_the_range_for_a_full_group():
    k = masking.MAX_MEMBERS
    assert k * masking.RANGE * 2**masking.SCALE_BITS < 2**63
    for edge in (masking.RANGE, -masking.RANGE):
        models = [np.full(50, edge)] * k
        assert np.all(masking.decode_mean(masking.add(masked_all(models)), k) == edge)
    mixed = [np.full(50, masking.RANGE)] * (k - 1) + [np.full(50, -masking.RANGE)]
    assert np.allclose(masking.decode_mean(masking.add(masked_all(mixed)), k), masking.RANGE * (k - 2) / k)


def test_pair_seeds_agree_and_depend_on_the_round_and_the_members():
    a, b, c = fixed_keys(3)
    pa, pb = masking.public_bytes(a), masking.public_bytes(b)
    members = ["x", "y", "z"]
    seed = masking.pair_seed(a, pb, ROUND, members, 0, 1)
    assert seed == masking.pair_seed(b, pa, ROUND, members, 1, 0)
    assert seed != masking.pair_seed(a, pb, bytes(16), members, 0, 1)
    assert seed != masking.pair_seed(a, pb, ROUND, ["x", "y", "w"], 0, 1)
    with pytest.raises(ValueError):  # a low-order point: an all-zero shared secret
        masking.pair_seed(a, bytes(32), ROUND, members, 0, 1)
    with pytest.raises(ValueError):
        masking.pair_seed(a, pb[:31], ROUND, members, 0, 1)


def test_a_mask_never_runs_past_the_ciphers_block_counter():
    """ChaCha20's 32-bit block counter covers 2**35 uint64: a longer mask, or a round announcing a longer model,
    is refused (before anything is allocated)."""
    with pytest.raises(ValueError, match="at most"):
        masking.mask(bytes(32), masking.MAX_COORDINATES + 1)
    invite = groupwire.Invite("0" * 32, "a", ("a", "b", "c"), "c", "digits", "m", masking.MAX_COORDINATES + 1)
    with pytest.raises(WireError, match="field 'n'"):
        groupwire.decode_invite(groupwire.encode_invite(invite))
    assert groupwire.decode_invite(groupwire.encode_invite(dataclasses.replace(invite, n=masking.MAX_COORDINATES)))


# -- what a member's masked model looks like ------------------------------------------------------------------------
def test_a_masked_model_is_indistinguishable_from_uniform_random_bytes():
    """The masked vector of an all-zero model (as far from random as a model gets), as the initiator receives it:
    byte frequencies (chi-square) and the coordinates as fractions of 2**64 (Kolmogorov-Smirnov) look uniform;
    the same tests tell the unmasked encoding apart at once. Fixed keys and round id: the outcome cannot flake."""
    n = 4096
    zeros = [np.zeros(n, np.float32)] * 3
    for vector in masked_all(zeros)[1:]:
        counts = np.bincount(vector.astype("<u8").view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 0.01
        assert stats.kstest(vector.astype(np.float64) / 2.0**64, "uniform").pvalue > 0.01
    plain = masking.encode(np.random.default_rng(2).normal(0, 0.1, n))  # a model's encoding without masks
    assert stats.chisquare(np.bincount(plain.view(np.uint8), minlength=256)).pvalue < 1e-9
    assert stats.kstest(plain.astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-9


# -- options -------------------------------------------------------------------------------------------------------
def test_options_that_cannot_work_are_refused(make_config, tmp_path):
    key = write_key(tmp_path)
    for kw, words in (
        (dict(secure_group=2, secret_file=key), "3 to 64"),
        (dict(secure_group=3), "--secret-file or mutual TLS"),
        (dict(secure_group=3, secret_file=key), "needs --read-token-file"),  # else anyone reads the model
        (dict(secure_group=3, secret_file=key, read_token=TOKEN, merge="pushsum"), "merge pushsum"),
        (dict(secure_group=3, secret_file=key, read_token=TOKEN, clip_radius="1.0"), "clip-radius"),
    ):
        with pytest.raises(ConfigError, match=words):
            make_config(**kw)
    assert make_config(secure_group=3, secret_file=key, read_token=TOKEN).secure_group == 3


# -- real nodes --------------------------------------------------------------------------------------------------
def write_key(tmp_path, key: bytes = KEY, name: str = "cluster.key") -> str:
    path = tmp_path / name
    path.write_bytes(key)
    path.chmod(0o600)
    return str(path)


def group_config(make_config, key_file: str, i: int, **kw):
    base = dict(id=f"g{i}", seed=i, no_train=True, secret_file=key_file, secure_group=3, gossip_interval=1000,
                read_token=TOKEN)  # fmt: skip
    return make_config(**{**base, **kw})


def ref(node) -> Peer:
    return Peer(node.id, node.url, "digits", "static")


def snapshot(*nodes) -> list[np.ndarray]:
    return [flatten(params_of(n)) for n in nodes]


def unchanged(nodes, before) -> bool:
    return all(np.array_equal(b, a) for a, b in zip(snapshot(*nodes), before, strict=True)) and not any(
        n.learner.merges for n in nodes
    )


async def test_four_members_reach_consensus_with_the_mean_conserved(make_config, tmp_path):
    key = write_key(tmp_path)
    fast = dict(gossip_interval=0.1, pex_interval=0.2)
    async with running(group_config(make_config, key, 0, **fast)) as (a,):
        seed = (f"127.0.0.1:{a.port}",)  # one seed: the others say hello, and learn each other by peer exchange
        configs = [group_config(make_config, key, i, seeds=seed, **fast) for i in (1, 2, 3)]
        async with running(*configs) as rest:
            nodes = [a, *rest]
            s0, mean0 = spread(nodes), np.mean(snapshot(*nodes), axis=0)
            assert await wait_for(lambda: spread(nodes) < s0 / 100, timeout=30, interval=0.05)
            for n in nodes:
                n.gossiper.close()  # no new round; let the last one finish
            assert await wait_for(lambda: not any(n.group.round_id or n.group.tasks for n in nodes), 5, 0.02)
            mean = np.mean(snapshot(*nodes), axis=0)
            assert np.max(np.abs(mean - mean0)) < 1e-6  # float32 rounding of each mean; fixed point is finer
            assert sum(n.group.stats.committed for n in nodes) >= 3
            assert all(n.gossiper.stats.ok == n.gossiper.stats.served == 0 for n in nodes)  # no pairwise exchange
            status = a.status()["group"]
            assert status["size"] == 3 and status["scale_bits"] == masking.SCALE_BITS
            assert status["last"]["members"] == 3 and status["last"]["bytes"] > 0


class FakeInitiator:
    """Signs group messages as the member "tester", as a node's initiator would send them."""

    def __init__(self, http, node) -> None:
        self.http, self.node, self.key = http, node, ClusterKey(KEY)

    async def post(self, path: str, body: bytes = b"", key: ClusterKey | None = None) -> tuple[int, bytes]:
        header, _ = (key or self.key).sign_request("POST", path, "tester", self.node.id, body)
        async with self.http.post(self.node.url + path, data=body, headers={HEADER: header}) as r:
            return r.status, await r.read()

    async def try_invite(self, round_id: str, members: list[str]) -> tuple[int, bytes]:
        msg = groupwire.Invite(round_id, "tester", tuple(members), self.node.config.cluster, self.node.task.name,
                               self.node.gossiper.model_digest, self.node.group.n)  # fmt: skip
        return await self.post("/v1/group", groupwire.encode_invite(msg))

    async def invite(self, round_id: str, members: list[str]) -> groupwire.Joined:
        status, body = await self.try_invite(round_id, members)
        assert status == 200, body
        return groupwire.decode_joined(body, round_id)

    async def masked(self, round_id: str, members: list[str]) -> None:
        """Invite the node and send it keys: it sends its masked model and waits for the decision."""
        joined = await self.invite(round_id, members)
        keys = (masking.public_bytes(masking.new_key()), joined.key, masking.public_bytes(masking.new_key()))
        status, _ = await self.post(f"/v1/group/{round_id}/mask", groupwire.encode_keys(groupwire.Keys(
            round_id, "tester", keys)))  # fmt: skip
        assert status == 200 and self.node.group.rounds[round_id].state == "masked"

    async def commit(self, round_id: str, model: np.ndarray) -> tuple[int, bytes]:
        """Commit the round as if every member had sent ``model`` (``groupwire.flatten``: the mean is ``model``)."""
        total = masking.add([masking.encode(model)] * 3)
        return await self.post(f"/v1/group/{round_id}/commit", groupwire.encode_vector(groupwire.Vector(
            round_id, "tester", total, 0)))  # fmt: skip


def aborted_at(node, round_id: str) -> bool:
    return node.group.outcomes.get(round_id) == "aborted" and node.group.round_id is None


async def test_bad_group_messages_are_refused_the_round_aborts_and_the_model_is_unchanged(make_config, tmp_path, http):
    key = write_key(tmp_path)
    async with running(group_config(make_config, key, 1)) as (b,):
        fake, before = FakeInitiator(http, b), snapshot(b)
        members = ["tester", b.id, "absent"]
        third = masking.public_bytes(masking.new_key())

        async def keys_for(round_id: str, keys: list[bytes] | None = None, body_round: str | None = None):
            joined = await fake.invite(round_id, members)
            assert b.group.round_id == round_id  # the member holds the round
            keys = keys or [masking.public_bytes(masking.new_key()), joined.key, third]
            body = groupwire.encode_keys(groupwire.Keys(body_round or round_id, "tester", tuple(keys)))
            return await fake.post(f"/v1/group/{round_id}/mask", body)

        # a wrong round id in the body, a key that is not a valid point, someone else's key in this node's place
        r1, r2, r3 = (f"{i:032x}" for i in (1, 2, 3))
        status, body = await keys_for(r1, body_round="f" * 32)
        assert status == 400 and b"round" in body and aborted_at(b, r1)
        joined = await fake.invite(r2, members)  # an all-zero key (a low-order point) for the initiator
        body = groupwire.encode_keys(groupwire.Keys(r2, "tester", (bytes(32), joined.key, third)))
        status, body = await fake.post(f"/v1/group/{r2}/mask", body)
        assert status == 400 and b"member 0's key cannot be used" in body and aborted_at(b, r2)
        status, body = await keys_for(r3, keys=[third, third, third])
        assert status == 400 and b"this node gave" in body
        assert aborted_at(b, r3)
        # a commit whose sum has the wrong length, or is not made of integers modulo 2**64
        for i, (dtype, n) in enumerate((("<u8", b.group.n - 1), ("<i8", b.group.n), ("<f8", b.group.n))):
            round_id = f"{10 + i:032x}"
            status, _ = await keys_for(round_id)
            assert status == 200 and b.group.rounds[round_id].state == "masked"
            bad = {"v": 1, "round": round_id, "sender": "tester", "age": 0,
                   "sum": {"dtype": dtype, "shape": [n], "data": bytes(8 * n)}}  # fmt: skip
            status, body = await fake.post(f"/v1/group/{round_id}/commit", msgpack.packb(bad))
            assert status == 400 and aborted_at(b, round_id), body
        # a request that fails authentication (another cluster key) is refused before it reaches the round
        round_id = f"{20:032x}"
        await fake.invite(round_id, members)
        status, _ = await fake.post(f"/v1/group/{round_id}/abort", key=ClusterKey(OTHER_KEY))
        assert status == 401 and b.group.round_id == round_id
        status, _ = await fake.post(f"/v1/group/{round_id}/abort")
        assert status == 200 and aborted_at(b, round_id)
        # a round that was aborted cannot be joined again
        again = groupwire.Invite(round_id, "tester", tuple(members), b.config.cluster, "digits",
                                 b.gossiper.model_digest, b.group.n)  # fmt: skip
        assert (await fake.post("/v1/group", groupwire.encode_invite(again)))[0] == 409
        # only the round's initiator speaks for it: another member's message is refused (401)
        round_id = f"{21:032x}"
        await fake.invite(round_id, members)
        header, _ = ClusterKey(KEY).sign_request("POST", f"/v1/group/{round_id}/abort", "intruder", b.id, b"")
        async with http.post(f"{b.url}/v1/group/{round_id}/abort", headers={HEADER: header}) as r:
            assert r.status == 401 and b.group.round_id == round_id
        assert (await fake.post(f"/v1/group/{round_id}/abort"))[0] == 200
        # a hello must be well formed and come from the member it names: neither refusal adds a peer
        peers = sorted(p.id for p in b.peers.all())
        assert (await fake.post("/v1/group/hello", b"\x93junk"))[0] == 400
        assert (await fake.post("/v1/group/hello", groupwire.encode_hello("tester", 0)))[0] == 400
        assert (await fake.post("/v1/group/hello", groupwire.encode_hello("mallory", 9)))[0] == 401
        assert sorted(p.id for p in b.peers.all()) == peers
        assert unchanged([b], before) and b.group.stats.rejected >= 7 and b.group.stats.joined == 0
        assert b.group.stats.left == 8  # each aborted round counted once
        # and the node still takes a good round whole, keeping a local step made during the round: here every
        # member sent b's model, so the mean is what b sent, and b ends at mean + (its model now - what it sent)
        round_id = f"{30:032x}"
        sent = masking.encode(groupwire.flatten(params_of(b), b.gossiper.spec))
        assert (await keys_for(round_id))[0] == 200
        await asyncio.to_thread(b.learner.train_steps, 1)
        trained = snapshot(b)[0]
        assert np.max(np.abs(trained - before[0])) > 1e-4
        commit = groupwire.encode_vector(groupwire.Vector(round_id, "tester", masking.add([sent] * 3), 0))
        status, body = await fake.post(f"/v1/group/{round_id}/commit", commit)
        assert status == 200 and b'"committed"' in body
        assert await wait_for(lambda: b.learner.merges == 1, 5, 0.02)
        np.testing.assert_allclose(snapshot(b)[0], trained, atol=1e-7)


async def test_a_round_aborts_at_every_member_when_one_fails_and_the_others_go_on(make_config, tmp_path, http):
    key, other = write_key(tmp_path), write_key(tmp_path, OTHER_KEY, "other.key")
    configs = [group_config(make_config, key, i) for i in range(4)] + [group_config(make_config, other, 4)]
    async with running(*configs) as (a, b, c, d, outsider):
        before = snapshot(a, b, c, d)

        # a member whose masked vector has the wrong length
        async def short(round_id, body, member, real=c.group.mask):
            reply = groupwire.decode_masked(await real(round_id, body, member), round_id, c.group.n)
            return groupwire.encode_vector(groupwire.Vector(round_id, c.id, reply.data[:-1]))

        c.group.mask = short
        assert await a.group.run(http, [ref(b), ref(c)]) == "aborted"
        assert a.group.stats.last["reason"] == "invalid"
        assert await wait_for(lambda: b.group.round_id is None and c.group.round_id is None, 5, 0.02)
        assert unchanged([a, b, c, d], before)

        # a member that cannot prove it holds the cluster key (another key): 401, the round aborts
        assert await a.group.run(http, [ref(b), ref(outsider)]) == "aborted"
        assert a.group.stats.last["reason"] == "unauthorized"
        assert await wait_for(lambda: b.group.round_id is None, 5, 0.02) and unchanged([a, b, c, d], before)

        # a member that stops answering after the invite: the round times out and aborts everywhere
        async def hang(*args):
            await asyncio.sleep(30)

        c.group.mask = hang
        default, a.group.timeout = a.group.timeout, aiohttp.ClientTimeout(total=0.5)  # (default: 2 s and more)
        assert await a.group.run(http, [ref(b), ref(c)]) == "aborted"
        a.group.timeout = default
        assert a.group.stats.last["reason"] == "timeout"
        assert await wait_for(lambda: b.group.round_id is None, 5, 0.02) and unchanged([a, b, c, d], before)
        assert not b.group.rounds and b.group.stats.joined == 0 and b.group.stats.aborts["initiator"] >= 2

        # the others go on with another group: a, b and d end at their exact mean, c keeps its model
        assert await a.group.run(http, [ref(b), ref(d)]) == "committed"
        assert await wait_for(lambda: b.learner.merges == d.learner.merges == 1, 5, 0.02)
        expected = (before[0].astype(np.float64) + before[1] + before[3]) / 3
        for n in (a, b, d):
            np.testing.assert_allclose(snapshot(n)[0], expected, atol=1e-7)
        assert np.array_equal(snapshot(c)[0], before[2]) and c.learner.merges == 0
        assert a.group.stats.committed == 1 and b.group.stats.joined == d.group.stats.joined == 1


async def test_a_group_node_takes_no_pairwise_exchange_and_keeps_its_model_from_members(make_config, tmp_path, http):
    key = write_key(tmp_path)
    async with running(group_config(make_config, key, 0)) as (g,):
        seed = (f"127.0.0.1:{g.port}",)
        async with running(make_config(id="pairwise", no_train=True, secret_file=key, seeds=seed)) as (p,):
            assert await wait_for(lambda: p.peers.ignored(), 10)
            assert "secure-group" in p.peers.ignored()[0]["reason"] and g.id not in p.peers
            body = message(g, sender="pairwise")
            header, _ = ClusterKey(KEY).sign_request("POST", "/v1/gossip", "pairwise", g.id, body)
            async with http.post(g.url + "/v1/gossip", data=body, headers={HEADER: header}) as r:
                assert r.status == 409 and (await r.json())["error"] == GROUP_ONLY
            header, _ = ClusterKey(KEY).sign_request("GET", "/v1/model", "pairwise", g.id)
            async with http.get(g.url + "/v1/model", headers={HEADER: header}) as r:
                assert r.status == 403
            # nor query it: inference is refused to a member; the operator reads and queries with the read token
            path, query = "/v2/models/digits/infer", {"inputs": [{"name": "input", "shape": [1, 64],
                                                                  "datatype": "FP32", "data": [0.0] * 64}]}  # fmt: skip
            header, _ = ClusterKey(KEY).sign_request("POST", path, "pairwise", g.id)
            async with http.post(g.url + path, json=query, headers={HEADER: header}) as r:
                assert r.status == 403 and "secure group" in (await r.json())["error"]
            operator = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(g.url + path, json=query, headers=operator) as r:
                assert r.status == 200
            async with http.get(g.url + "/v1/model", headers=operator) as r:
                assert r.status == 200
            async with http.get(g.url + "/v1/model") as r:
                assert r.status == 401  # (a node with --secure-group always has a read token)
            header, _ = ClusterKey(KEY).sign_request("POST", "/v1/group", "x", p.id, b"")
            async with http.post(p.url + "/v1/group", headers={HEADER: header}) as r:
                assert r.status == 409  # a pairwise node takes part in no group round
            assert g.learner.merges == 0 and g.status()["group"]["size"] == 3 and p.status()["group"] is None
            header, _ = ClusterKey(KEY).sign_request("GET", "/metrics", "pairwise", g.id)
            async with http.get(g.url + "/metrics", headers={HEADER: header}) as r:
                text = await r.text()
            assert 'gossipfl_group_rounds_total{outcome="committed",role="initiator"} 0.0' in text
            assert "gossipfl_group_out_of_range_total 0.0" in text


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The cluster CA with certificates for g0..g2 (as tests/test_mtls.py), and another CA's for "sybil"."""
    from gossipfl.security.certs import init_ca, issue

    root = tmp_path_factory.mktemp("group-pki")
    good, other = root / "good", root / "other"
    init_ca(good), init_ca(other)
    for i in range(3):
        issue(good, f"g{i}")
    issue(other, "sybil")
    return good, other


def tls_files(folder, node_id: str) -> TlsFiles:
    return TlsFiles(f"{folder}/{node_id}.crt", f"{folder}/{node_id}.key", f"{folder}/ca.crt")


async def test_under_mutual_tls_keys_are_bound_to_members_an_invented_or_substituted_key_is_refused(make_config, pki):
    """A member acting as a malicious initiator (g0, with its real certificate) tries to unmask g1: by inventing
    a third member whose key it made, or by putting its own key in a real member's (g2's) place. Every key must
    come with a signature by the certificate of the member listed for it: each attempt is refused (400), the
    round aborts, g1's model is unchanged; an honest round over mutual TLS alone commits."""
    good, other = pki
    files = [tls_files(good, f"g{i}") for i in range(3)]
    configs = [make_config(id=f"g{i}", seed=i, no_train=True, secure_group=3, gossip_interval=1000, read_token=TOKEN,
                           tls_cert=f.cert, tls_key=f.key, tls_ca=f.ca) for i, f in enumerate(files)]  # fmt: skip
    ctx = client_context(tls_files(good, "g0"), check_id=False)
    mallory = KeyBinder.load(tls_files(good, "g0"), "g0")  # g0's certificate and key: a real member's
    sybil = KeyBinder.load(tls_files(other, "sybil"), "sybil")  # a certificate naming "sybil", of another CA
    async with running(*configs) as (a, b, c), aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as tls:
        before = snapshot(a, b, c)
        assert b.status()["group"]["bound_keys"] is True

        async def post(path: str, body: bytes) -> tuple[int, bytes]:
            async with tls.post(b.url + path, data=body) as r:
                return r.status, await r.read()

        async def attempt(n: int, members: tuple[str, ...], forge) -> bytes:
            round_id = f"{n:032x}"
            invite = groupwire.Invite(round_id, "g0", members, b.config.cluster, "digits", b.gossiper.model_digest,
                                      b.group.n)  # fmt: skip
            status, raw = await post("/v1/group", groupwire.encode_invite(invite))
            joined = groupwire.decode_joined(raw, round_id)
            assert status == 200 and joined.proof is not None  # g1's own key comes signed by g1
            mallory.verify(joined.proof, round_id, members, "g1", joined.key)
            own, third = (masking.public_bytes(masking.new_key()) for _ in range(2))
            keys, proofs = forge(round_id, members, own, joined, third)
            msg = groupwire.Keys(round_id, "g0", keys, proofs)
            status, body = await post(f"/v1/group/{round_id}/mask", groupwire.encode_keys(msg))
            assert status == 400 and aborted_at(b, round_id), body
            return body

        def mine(round_id, members, own, joined, third):  # mallory signs the third key as its own
            return (own, joined.key, third), (mallory.sign(round_id, members, own), joined.proof,
                                              mallory.sign(round_id, members, third))  # fmt: skip

        def from_other_ca(round_id, members, own, joined, third):
            return (own, joined.key, third), (mallory.sign(round_id, members, own), joined.proof,
                                              sybil.sign(round_id, members, third))  # fmt: skip

        def unsigned(round_id, members, own, joined, third):
            return (own, joined.key, third), None

        g2_cert = x509.load_pem_x509_certificate((good / "g2.crt").read_bytes()).public_bytes(Encoding.DER)

        def g2s_certificate(round_id, members, own, joined, third):  # g2's real (public) certificate, forged sig
            forged = Proof(mallory.sign(round_id, members, third).sig, g2_cert)
            return (own, joined.key, third), (mallory.sign(round_id, members, own), joined.proof, forged)

        body = await attempt(1, ("g0", "g1", "sybil"), mine)  # an invented member
        assert b"member 2's key is not bound" in body and b"'g0' offered for 'sybil'" in body
        body = await attempt(2, ("g0", "g1", "g2"), mine)  # mallory's key in g2's place
        assert b"'g0' offered for 'g2'" in body
        body = await attempt(3, ("g0", "g1", "sybil"), from_other_ca)
        assert b"not issued by the cluster CA" in body
        body = await attempt(4, ("g0", "g1", "g2"), unsigned)
        assert b"no certificate and signature" in body
        body = await attempt(5, ("g0", "g1", "g2"), g2s_certificate)
        assert b"signature of the key of 'g2' does not verify" in body
        assert unchanged([a, b, c], before) and b.group.stats.left == 5

        honest, c.group.binder = c.group.binder, mallory  # c answers with a proof made by g0's certificate
        assert await a.group.run(tls, [ref(b), ref(c)]) == "aborted"
        assert a.group.stats.last["reason"] == "invalid" and a.group.stats.aborts["invalid"] == 1
        c.group.binder = honest
        assert await wait_for(lambda: b.group.round_id is None and c.group.round_id is None, 5, 0.02)

        assert a.url.startswith("https://") and await a.group.run(tls, [ref(b), ref(c)]) == "committed"
        assert await wait_for(lambda: b.learner.merges == c.learner.merges == 1, 5, 0.02)
        for n in (a, b, c):
            np.testing.assert_allclose(snapshot(n)[0], np.mean(before, axis=0), atol=1e-7)


def table(tmp_path, centre: float) -> str:
    """A tabular data file whose last column lies around ``centre`` (unscaled, like a price)."""
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 1, (120, 3)), rng.normal(centre, 10, 120)].astype(np.float32)
    path = tmp_path / f"table-{centre:g}.npz"
    np.savez(path, x=x, y=(x[:, 0] > 0).astype(np.int64))
    return str(path)


def blow_up(node) -> None:
    """Put one coordinate of the node's model outside the fixed-point range (as a diverging run would)."""

    def fn(now):
        params = {k: v.copy() for k, v in now.params.items()}
        params[next(iter(params))].flat[0] = 2.0 * masking.RANGE
        return params, now.age, now.weight

    node.learner.update(fn)


async def test_unscaled_tabular_nodes_average_and_a_model_out_of_range_is_refused_quietly(
    make_config, tmp_path, http, caplog
):
    """Standardize's mean of squares of a column around 2,000 is 4e6: inside the fixed point, so tabular nodes
    on unscaled data average. A node whose initial model does not fit is refused at start; one whose model leaves
    the range later refuses rounds, counted, warned once, its 409 saying nothing of the model's values, and as
    an initiator contacts no one."""
    key = write_key(tmp_path)
    data = dict(task="tabular", data=table(tmp_path, 2000.0))
    with pytest.raises(StartError, match="does not fit the fixed point"):
        async with running(group_config(make_config, key, 9, task="tabular", data=table(tmp_path, 1e5))):
            pass
    async with running(*(group_config(make_config, key, i, **data) for i in range(3))) as (a, b, c):
        before = snapshot(a, b, c)
        assert max(np.max(np.abs(m)) for m in before) > 2**21  # far outside the former range (2**20)
        assert await a.group.run(http, [ref(b), ref(c)]) == "committed"
        assert await wait_for(lambda: b.learner.merges == c.learner.merges == 1, 5, 0.02)
        mean = np.mean(snapshot(a, b, c), axis=0)
        np.testing.assert_allclose(mean, np.mean(before, axis=0), rtol=1e-7, atol=1e-6)

        await asyncio.to_thread(blow_up, b)
        caplog.set_level(logging.DEBUG, logger="gossipfl")
        outcomes = {n.id: dict(n.group.outcomes) for n in (a, c)}
        assert await b.group.run(http, [ref(a), ref(c)]) == "aborted"  # as initiator: refused before inviting
        assert b.group.stats.last["reason"] == "out_of_range"
        await asyncio.sleep(0.1)
        assert {n.id: dict(n.group.outcomes) for n in (a, c)} == outcomes  # no abort sent to anyone
        status, body = await FakeInitiator(http, b).try_invite(f"{5:032x}", ["tester", b.id, c.id])
        assert status == 409 and b"cannot take part" in body
        assert not re.search(rb"\d", body)  # no index, no value of the model
        assert b.group.stats.out_of_range == 2 and b.group.round_id is None
        warned = [r for r in caplog.records if "does not fit" in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(warned) == 1


async def test_a_masked_member_holds_until_the_decision_and_never_applies_a_late_commit(make_config, tmp_path, http):
    """Once its masked model went out, a member keeps the round (and its merge flag) past its invite hold: it
    refuses other rounds until the decision; after give_up_s it aborts, and a commit that comes later is
    answered "aborted" and never applied on top of what happened since."""
    key = write_key(tmp_path)
    async with running(group_config(make_config, key, 1)) as (b,):
        fake, before = FakeInitiator(http, b), snapshot(b)[0]
        own = groupwire.flatten(params_of(b), b.gossiper.spec)  # (in the order a round's vectors use)
        b.group.hold_s, b.group.give_up_s = 0.2, 10.0
        r1, r2, r3 = (f"{i:032x}" for i in (1, 2, 3))
        await fake.masked(r1, ["tester", b.id, "third"])
        await asyncio.sleep(0.4)  # past the invite's hold
        assert b.group.round_id == r1 and r1 in b.group.rounds
        assert (await fake.try_invite(r2, ["tester", b.id, "third"]))[0] == 409  # in another round
        status, body = await fake.commit(r1, own)
        assert status == 200 and b'"committed"' in body
        assert await wait_for(lambda: b.learner.merges == 1 and b.group.round_id is None, 5, 0.02)

        b.group.give_up_s = 0.3
        await fake.masked(r3, ["tester", b.id, "third"])
        assert await wait_for(lambda: aborted_at(b, r3), 3, 0.02) and b.group.stats.aborts["no_decision"] == 1
        status, body = await fake.commit(r3, own + 1.0)
        assert status == 200 and b'"aborted"' in body
        await asyncio.sleep(0.1)
        assert b.learner.merges == 1 and np.allclose(snapshot(b)[0], before, atol=1e-7)


async def test_stopping_mid_round_ends_the_round_and_writes_the_last_checkpoint(
    make_config, tmp_path, http, monkeypatch
):
    """A node stopped while invited to a round aborts it at once; one stopped while its masked model waits for
    the decision takes a commit that comes within the grace, or aborts the round after it; in every case the
    last checkpoint is written."""
    key = write_key(tmp_path)
    configs = [group_config(make_config, key, i, state_dir=str(tmp_path / f"s{i}"), checkpoint_interval=1000)
               for i in (1, 2, 3)]  # fmt: skip
    async with running(*configs) as (b, d, e):
        for n in (b, d, e):
            await asyncio.to_thread(n.learner.train_steps, 1)  # something to checkpoint
        await FakeInitiator(http, b).invite(f"{1:032x}", ["tester", b.id, "third"])
        await b.stop()
        assert b.checkpoints.saves == 1 and b.group.stats.aborts["stopping"] == 1

        fake, round_id = FakeInitiator(http, d), f"{2:032x}"
        await fake.masked(round_id, ["tester", d.id, "third"])
        stopping = asyncio.ensure_future(d.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waiting for the decision
        status, body = await fake.commit(round_id, groupwire.flatten(params_of(d), d.gossiper.spec))
        assert status == 200 and b'"committed"' in body
        await stopping
        assert d.learner.merges == 1 and d.checkpoints.saves == 1 and d.checkpoints.written(d.learner.version)

        monkeypatch.setattr("gossipfl.node.STOP_GRACE_S", 0.3)
        await FakeInitiator(http, e).masked(f"{3:032x}", ["tester", e.id, "third"])
        await e.stop()  # no decision within the grace: aborted, the merge flag released
        assert e.checkpoints.saves == 1 and e.group.stats.aborts["stopping"] == 1 and e.learner.merges == 0

"""Compression (--compress): the codecs, the wire format of compressed messages, and exchanges between
real nodes with each codec: what each side ends with, what is conserved, and what is refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.protocol import compress, merge, wire
from tests.helpers import params_of, running, settled, wait_for

F32 = np.dtype("<f4")
finite32 = hnp.arrays(
    F32, st.integers(1, 700), elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
)


def fields_of(encoded: dict[str, np.ndarray]) -> dict[str, memoryview]:
    """The codec's fields as a receiver sees them (bin: bytes views)."""
    return {k: memoryview(np.ascontiguousarray(v)).cast("B") for k, v in encoded.items()}


def roundtrip(spec: str, x: np.ndarray) -> np.ndarray:
    codec = compress.parse(spec)
    return codec.decode(fields_of(codec.encode(x)), x.dtype, x.size)


@settings(max_examples=60, deadline=None)
@given(x=finite32)
def test_dense_codecs_stay_within_their_precision(x):
    assert np.array_equal(roundtrip("none", x), x)
    np.testing.assert_allclose(roundtrip("fp16", x), x, rtol=2**-11, atol=2**-24)  # half: 11 significant bits
    np.testing.assert_allclose(roundtrip("bf16", x), x, rtol=2**-8, atol=2**-133)  # 8 significant bits
    q = roundtrip("int8", x)
    for start in range(0, x.size, compress.INT8_BLOCK):  # an error of at most half a step of its own block
        block = x[start : start + compress.INT8_BLOCK]
        step = np.abs(block).max() / 127
        assert np.abs(q[start : start + compress.INT8_BLOCK] - block).max() <= step / 2 * (1 + 1e-5) + 1e-30


def test_bf16_rounds_to_nearest_even_and_int8_blocks_have_their_own_scale():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9], F32)
    assert roundtrip("bf16", x).tolist() == [1.0, 1.0, 1 + 2**-6, 1 + 2**-7]  # ties to even; above a tie: up
    x = np.concatenate([np.full(256, 1000.0, F32), np.linspace(-0.01, 0.01, 300, dtype=F32)])
    q = roundtrip("int8", x)
    assert np.array_equal(q[:256], x[:256]) and np.abs(q[256:] - x[256:]).max() <= 0.01 / 127 / 2 * 1.0001


def test_codecs_cost_the_bytes_they_announce():
    x = np.random.default_rng(0).normal(size=100_000).astype(F32)
    for spec in ("none", "fp16", "bf16", "int8"):
        codec = compress.parse(spec)
        nbytes = sum(v.nbytes for v in codec.encode(x).values())
        assert nbytes == pytest.approx(codec.ratio() * x.nbytes, rel=0.01), spec


def test_fp16_clips_what_it_cannot_hold_instead_of_sending_inf():
    x = np.array([1e6, -1e6, 3.0], F32)
    assert roundtrip("fp16", x).tolist() == [65504.0, -65504.0, 3.0]


def test_topk_takes_the_largest_moves_and_a_random_share_of_the_rest():
    rng = np.random.default_rng(1)
    codec = compress.parse("topk:0.1")
    moved = np.arange(10_000, dtype=F32) - 5000  # |moved| largest at both ends
    idx = codec.select(moved, rng)
    assert idx.dtype == compress.INDEX_DTYPE and idx.size == 1000 and np.all(np.diff(idx.astype(np.int64)) > 0)
    largest = set(np.argsort(-np.abs(moved))[:1000].tolist())
    assert len(largest & set(idx.tolist())) >= 750  # the top 75%, and some of the rest at random
    still = np.zeros(10_000, F32)  # nothing moved (no training): every draw lands somewhere else
    draws = [set(codec.select(still, rng).tolist()) for _ in range(5)]
    assert len(set().union(*draws)) >= 3500  # (5 independent draws of 10% cover 41% on average)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zip", "expected none, fp16, bf16, int8 or topk:FRACTION"),
        ("int8:2", "expected none, fp16, bf16, int8 or topk:FRACTION"),
        ("topk", "topk needs a fraction in (0, 0.5]"),
        ("topk:0", "topk needs a fraction"),
        ("topk:0.7", "beyond half"),
        ("topk:nan", "topk needs a fraction"),
    ],
)
def test_a_compression_spec_that_does_not_parse_is_refused(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        compress.parse(spec)


# -- the wire ------------------------------------------------------------------------------------------
SPEC = {"w": wire.TensorSpec("<f4", (300,)), "b": wire.TensorSpec("<f4", (2,))}


def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=300).astype(F32), "b": rng.normal(size=2).astype(F32)}


def test_uncompressed_messages_are_version_2_as_before_and_compressed_ones_version_3():
    plain = msgpack.unpackb(wire.encode(wire.GossipMessage("a", 1, params())).tobytes())
    assert plain["v"] == 2 and "compress" not in plain and set(plain["params"]["w"]) == {"dtype", "shape", "data"}
    packed = msgpack.unpackb(wire.encode(wire.GossipMessage("a", 1, params()), compress.parse("int8")).tobytes())
    assert packed["v"] == 3 and packed["compress"] == "int8" and set(packed["params"]["w"]) == {
        "dtype", "shape", "data", "scale"
    }  # fmt: skip
    assert len(packed["params"]["w"]["data"]) == 300 and len(packed["params"]["w"]["scale"]) == 2 * 4


def test_an_uncompressed_message_is_decoded_in_place_and_sent_without_copies():
    p = {"w": np.random.default_rng(0).normal(size=5000).astype(F32), "b": np.zeros(2, F32)}
    body = wire.encode(wire.GossipMessage("a", 1, p))
    assert any(np.shares_memory(np.frombuffer(part, np.uint8), p["w"]) for part in body)  # sent from the array
    assert not any(np.shares_memory(np.frombuffer(part, np.uint8), p["b"]) for part in body)  # small: in the head
    received = bytearray(body.tobytes())
    msg = wire.decode(received, wire.spec_of(p))
    assert np.shares_memory(msg.params["w"], np.frombuffer(received, np.uint8)) and msg.params["w"].flags.writeable
    assert np.array_equal(msg.params["w"], p["w"])


def tamper(body: bytes, path: list[str], value: object) -> bytes:
    obj = msgpack.unpackb(body)
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return msgpack.packb(obj, use_bin_type=True)


def int8_body() -> bytes:
    return wire.encode(wire.GossipMessage("a", 1, params()), compress.parse("int8")).tobytes()


def topk_body() -> tuple[bytes, dict[str, np.ndarray]]:
    p = params()
    index = {"w": np.array([3, 7, 299], compress.INDEX_DTYPE), "b": np.array([1], compress.INDEX_DTYPE)}
    values = {k: p[k][index[k]] for k in p}
    msg = wire.GossipMessage("a", 1, values, index=index)
    return wire.encode(msg, spec=SPEC).tobytes(), index


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: tamper(int8_body(), ["compress"], "zstd"), "unknown compression 'zstd'"),
        (lambda: tamper(int8_body(), ["v"], 2), "compression 'int8' in a message of version 2"),
        (lambda: tamper(int8_body(), ["compress"], None), "compression 'none' in a message of version 3"),
        (lambda: tamper(int8_body(), ["params", "w", "scale"], None), "field 'scale' must be bytes"),
        (lambda: tamper(int8_body(), ["params", "w", "scale"], b"\0" * 4), "4 scale bytes, expected 8"),
        (lambda: tamper(int8_body(), ["params", "w", "data"], b"\0" * 299), "299 data bytes, expected 300"),
        (lambda: tamper(int8_body(), ["params", "w", "data"], b"\x80" * 300), "-128 is out of range"),
        (
            lambda: tamper(int8_body(), ["params", "w", "scale"], np.array([1.0, -1.0], F32).tobytes()),
            "scales must be finite and >= 0",
        ),
        (
            lambda: tamper(int8_body(), ["params", "w", "scale"], np.array([1.0, np.inf], F32).tobytes()),
            "scales must be finite and >= 0",
        ),
        (
            lambda: tamper(int8_body(), ["params", "w", "scale"], np.array([3e38, 0], F32).tobytes()),
            "out of the range",
        ),
        (
            lambda: tamper(topk_body()[0], ["params", "w", "idx"], np.array([3, 3], "<u4").tobytes()),
            "strictly increasing",
        ),
        (
            lambda: tamper(topk_body()[0], ["params", "w", "idx"], np.array([5, 300], "<u4").tobytes()),
            "strictly increasing and below 300",
        ),
        (lambda: tamper(topk_body()[0], ["params", "w", "idx"], b"\0" * 5), "expected 4 per index"),
        (lambda: tamper(topk_body()[0], ["params", "w", "idx"], b""), "1 to 300 indices"),
        (lambda: tamper(topk_body()[0], ["params", "w", "data"], b"\0" * 8), "8 data bytes, expected 12"),
        (lambda: tamper(topk_body()[0], ["params", "b", "idx"], None), "field 'idx' must be bytes"),
    ],
)
def test_compressed_messages_that_disagree_with_the_model_are_refused(make, fragment):
    with pytest.raises(wire.WireError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        wire.decode(make(), SPEC)


def test_a_reply_must_match_the_compression_of_the_message_it_answers():
    body, index = topk_body()
    wire.decode(body, SPEC)  # a top-k request
    with pytest.raises(wire.WireError, match="a reply to a top-k message must be top-k"):
        wire.decode(int8_body(), SPEC, at=index)
    with pytest.raises(wire.WireError, match="a top-k reply to a message that was not top-k"):
        wire.decode(body, SPEC, reply=True)
    p = params(1)
    reply = wire.encode(
        wire.GossipMessage("b", 1, {k: p[k][index[k]] for k in p}, index=index), send_index=False, spec=SPEC
    )
    got = wire.decode(reply, SPEC, at=index)
    assert np.array_equal(got.params["w"], p["w"][index["w"]]) and got.index is not None
    with pytest.raises(wire.WireError, match="3 data bytes|data bytes, expected"):
        wire.decode(reply, SPEC, at={"w": index["w"][:2], "b": index["b"]})


# -- exchanges between real nodes ------------------------------------------------------------------------
async def one_exchange(make_config, http, spec: str) -> tuple[dict, dict, dict, dict, object, object]:
    a_cfg = make_config(no_train=True, seed=1, gossip_interval=1000, compress="none")
    async with running(a_cfg) as (a,):
        b_cfg = make_config(no_train=True, seed=2, gossip_interval=1000, seeds=(f"127.0.0.1:{a.port}",), compress=spec)
        async with running(b_cfg) as (b,):
            assert await wait_for(lambda: a.id in b.peers, timeout=10)
            a0, b0 = params_of(a), params_of(b)
            assert await b.gossiper.exchange(http, b.peers.get(a.id)) == "ok"
            await settled(a, b)
            return a0, b0, params_of(a), params_of(b), a.gossiper.stats, b.gossiper.stats


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8"])
async def test_a_lossy_exchange_merges_the_same_decoded_models_and_each_keeps_its_own_residual(make_config, http, spec):
    """Both sides merge what the messages decode to, D(a) and D(b), so both compute the same mean m; each
    then keeps what the codec lost of its own model: a' = a + (m - D(a)), b' = b + (m - D(b)). The sum of
    the two models is conserved (the network mean does not drift), and a' - b' is the difference of the two
    residuals, at most a quantization step. The responder (a, configured without compression) answers in the
    initiator's codec."""
    codec = compress.parse(spec)
    a0, b0, a1, b1, a_stats, b_stats = await one_exchange(make_config, http, spec)
    for k in a0:
        da, db = roundtrip(spec, a0[k].reshape(-1)), roundtrip(spec, b0[k].reshape(-1))
        m = merge.weighted_mean({k: da}, {k: db}, 1.0, 1.0)[k]
        np.testing.assert_array_equal(a1[k].reshape(-1), a0[k].reshape(-1) + (m - da))
        np.testing.assert_array_equal(b1[k].reshape(-1), b0[k].reshape(-1) + (m - db))
        np.testing.assert_allclose(a1[k] + b1[k], a0[k] + b0[k], rtol=0, atol=1e-6)
        assert not np.array_equal(a1[k], b1[k])  # (the residuals differ: lossy, not exact)
    dense = sum(a.nbytes for a in a0.values())
    assert b_stats.bytes_sent == pytest.approx(dense * codec.ratio(), rel=0.25, abs=2000)
    assert a_stats.bytes_sent == pytest.approx(b_stats.bytes_sent, rel=0.01)  # answered in the same codec


async def test_a_topk_exchange_averages_the_chosen_coordinates_exactly_on_both_sides(make_config, http):
    a0, b0, a1, b1, a_stats, b_stats = await one_exchange(make_config, http, "topk:0.1")
    changed_total, size = 0, 0
    for k in a0:
        changed = a1[k] != a0[k]
        assert np.array_equal(changed, b1[k] != b0[k])  # the same coordinates moved on both sides
        np.testing.assert_array_equal(a1[k][changed], (a0[k][changed] * 0.5 + b0[k][changed] * 0.5))
        np.testing.assert_array_equal(a1[k][changed], b1[k][changed])  # and agree exactly there
        changed_total, size = changed_total + changed.sum(), size + changed.size
    assert 0.08 * size <= changed_total <= 0.12 * size
    dense = sum(a.nbytes for a in a0.values())
    assert b_stats.bytes_sent < 0.25 * dense and a_stats.bytes_sent < 0.15 * dense  # index + value; value


@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
async def test_pure_averaging_with_compression_conserves_the_mean_and_reaches_consensus(make_config, spec):
    """Four nodes without training: compressed gossip still conserves the network mean and shrinks the spread
    far below where it started (int8: down to its quantization noise; top-k: every coordinate in turn)."""
    from gossipfl.protocol.consensus import consensus_distance, flatten, network_mean

    first = make_config(no_train=True, seed=0, gossip_interval=0.05, compress=spec)
    async with running(first) as (a,):
        seeds = (f"127.0.0.1:{a.port}",)
        configs = [
            make_config(no_train=True, seed=i, gossip_interval=0.05, compress=spec, seeds=seeds) for i in range(1, 4)
        ]
        async with running(*configs) as rest:
            nodes = [a, *rest]
            start = [flatten(params_of(n)) for n in nodes]
            mean0, spread0 = network_mean(start), consensus_distance(start)
            assert await wait_for(
                lambda: consensus_distance([flatten(params_of(n)) for n in nodes]) < spread0 / 20,
                timeout=40,
                interval=0.2,
            )
            for n in nodes:
                n.gossiper.close()
            await settled(*nodes)
            final = [flatten(params_of(n)) for n in nodes]
    np.testing.assert_allclose(network_mean(final), mean0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [1.8e-43, 2.7e-43, 5e-42, 1.5e-36])
def test_int8_never_sends_what_it_would_refuse(value):
    """Found in review: a block whose largest magnitude is tiny has a subnormal scale, x / scale rounded past
    127 and the cast wrapped to -128 (or flipped signs): the node refused its own message."""
    x = np.full(300, value, F32)
    x[::2] *= -1
    q = roundtrip("int8", x)  # decodes without ValueError
    assert np.all(np.sign(q) * np.sign(x) >= 0)
    big = np.array([1e300, -1e300, 1.0], np.float64)  # float64 beyond float32: clipped, not an infinite scale
    assert np.isfinite(roundtrip("int8", big)).all()

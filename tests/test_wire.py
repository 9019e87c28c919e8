import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.protocol import wire

SPEC = {"w": wire.TensorSpec("<f4", (3, 2)), "b": wire.TensorSpec("<f4", (2,))}


def good_params():
    return {"w": np.arange(6, dtype="<f4").reshape(3, 2), "b": np.array([0.5, -1.0], dtype="<f4")}


def raw(params=None, **top):
    params = good_params() if params is None else params
    body = {
        "v": 2,
        "sender": "a",
        "age": 3,
        "params": {k: {"dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()} for k, v in params.items()},
    }
    body.update(top)
    return body


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def test_roundtrip_keeps_values_and_fields():
    body = wire.encode(wire.GossipMessage("node-a", 42, good_params(), task="digits"))
    msg = wire.decode(body, SPEC, task="digits")
    assert (msg.sender, msg.age, msg.task) == ("node-a", 42, "digits")
    for k, v in good_params().items():
        np.testing.assert_array_equal(msg.params[k], v)


def test_encoded_layout_is_the_documented_contract():
    obj = msgpack.unpackb(wire.encode(wire.GossipMessage("n", 1, good_params())).tobytes(), raw=False)
    assert set(obj) == {"v", "sender", "age", "params"}
    assert obj["v"] == 2
    assert obj["params"]["w"]["dtype"] == "<f4"
    assert obj["params"]["w"]["shape"] == [3, 2]
    assert isinstance(obj["params"]["w"]["data"], bytes) and len(obj["params"]["w"]["data"]) == 24


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(
            dtype=np.dtype("<f4"),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
            elements=st.floats(-1e6, 1e6, width=32),
        ),
        min_size=1,
        max_size=4,
    ),
    age=st.integers(0, wire.MAX_AGE),
)
def test_roundtrip_property(arrays, age):
    spec = wire.spec_of(arrays)
    body = wire.encode(wire.GossipMessage("s", age, arrays))
    assert len(body) <= wire.max_message_size(spec)
    msg = wire.decode(body, spec)
    assert msg.age == age
    for k, v in arrays.items():
        np.testing.assert_array_equal(msg.params[k], v)


def bad(p, field, value):
    p = dict(p)
    p[field] = value
    return p


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc1\xc1garbage", "malformed msgpack"),
        (b"", "malformed msgpack"),
        (pack([1, 2, 3]), "must be a msgpack map"),
        (pack({k: v for k, v in raw().items() if k != "v"}), "missing field 'v'"),
        (pack(raw(v=1)), "unsupported protocol version 1, this node speaks 2"),
        (pack(raw(v="1")), "field 'v' must be an integer"),
        (pack(raw(v=True)), "field 'v' must be an integer"),
        (pack({k: v for k, v in raw().items() if k != "sender"}), "missing field 'sender'"),
        (pack(raw(sender="")), "'sender' must have 1 to"),
        (pack(raw(sender="x" * 300)), "'sender' must have 1 to"),
        (pack(raw(age=-1)), "'age' must be an integer from 0 to 2\\*\\*53"),
        (pack(raw(age=2**53 + 1)), "'age' must be an integer from 0 to 2\\*\\*53, got 9007199254740993"),
        (pack(raw(age=2**64 - 1)), "'age' must be an integer from 0 to 2\\*\\*53"),
        (pack(raw(age=1.5)), "field 'age' must be an integer"),
        (pack({k: v for k, v in raw().items() if k != "params"}), "missing field 'params'"),
        (pack({**raw(), "params": [1]}), "field 'params' must be dict"),
        (pack(raw(task="other")), "task 'other' does not match"),
        (pack(raw(task=7)), "field 'task' must be str"),
    ],
)
def test_rejects_bad_envelope(body, fragment):
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode(body, SPEC, task="digits")


def test_rejects_missing_and_unknown_parameters():
    p = good_params()
    del p["b"]
    with pytest.raises(wire.WireError, match="missing parameters: b"):
        wire.decode(pack(raw(p)), SPEC)
    p = {**good_params(), "extra": np.zeros(1, "<f4")}
    with pytest.raises(wire.WireError, match="unknown parameters: extra"):
        wire.decode(pack(raw(p)), SPEC)


def tensor_body(**tensor_fields):
    body = raw()
    body["params"]["w"] = {**body["params"]["w"], **tensor_fields}
    return pack(body)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (tensor_body(dtype="<f8", data=np.zeros(6, "<f8").tobytes()), "parameter 'w': dtype '<f8', expected '<f4'"),
        (tensor_body(dtype=">f4"), "dtype '>f4', expected '<f4'"),
        (tensor_body(shape=[2, 3]), r"parameter 'w': shape \[2, 3\], expected \[3, 2\]"),
        (tensor_body(shape=[3, 2, 1]), "shape"),
        (tensor_body(shape=["3", 2]), "shape"),
        (tensor_body(data=b"\x00" * 20), "20 data bytes, expected 24"),
        (tensor_body(data="text"), "field 'data' must be bytes"),
        (tensor_body(data=np.array([1, 2, np.nan, 4, 5, 6], "<f4").tobytes()), "NaN or Inf"),
        (tensor_body(data=np.array([1, 2, 3, np.inf, 5, 6], "<f4").tobytes()), "NaN or Inf"),
        (pack({**raw(), "params": {**raw()["params"], "w": [1, 2]}}), "must be a map with dtype"),
    ],
)
def test_rejects_bad_tensors(body, fragment):
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode(body, SPEC)


def test_decode_never_unpickles():
    import pickle

    with pytest.raises(wire.WireError):
        wire.decode(pickle.dumps(good_params()), SPEC)


def test_max_message_size_bounds_real_messages():
    body = wire.encode(
        wire.GossipMessage("x" * 255, wire.MAX_AGE, good_params(), task="t" * 100, xid=wire.new_xid(), samples=2**53)
    )
    assert len(body) <= wire.max_message_size(SPEC)


def test_optional_fields_roundtrip():
    msg = wire.GossipMessage("a", 1, good_params(), task="digits", merge="pushsum", samples=180, weight=12.5, port=8470)
    out = wire.decode(wire.encode(msg), SPEC, task="digits")
    assert (out.merge, out.samples, out.weight, out.port) == ("pushsum", 180, 12.5, 8470)
    assert wire.decode(pack(raw(weight=3)), SPEC).weight == 3.0  # an integer weight is accepted


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"samples": -1}, "'samples' must be an integer from 0 to 2\\*\\*53"),
        ({"samples": 2**53 + 1}, "'samples' must be an integer from 0 to 2\\*\\*53"),
        ({"xid": "0" * 31}, "'xid' must be 32 lowercase hex digits"),
        ({"xid": "A" * 32}, "'xid' must be 32 lowercase hex digits"),
        ({"xid": 5}, "field 'xid' must be str"),
        ({"samples": 2.5}, "field 'samples' must be an integer"),
        ({"weight": 0.0}, "'weight' must be a positive finite number"),
        ({"weight": float("nan")}, "'weight' must be a positive finite number"),
        ({"weight": float("inf")}, "'weight' must be a positive finite number"),
        ({"weight": "heavy"}, "field 'weight' must be float"),
        ({"weight": 1e300}, "at most 1e\\+15"),
        ({"port": 0}, "'port' must be from 1 to 65535"),
        ({"port": 70000}, "'port' must be from 1 to 65535"),
        ({"port": "80"}, "field 'port' must be an integer"),
        ({"merge": 5}, "field 'merge' must be str"),
    ],
)
def test_rejects_bad_optional_fields(extra, fragment):
    with pytest.raises(wire.WireError, match=fragment):
        wire.decode(pack(raw(**extra)), SPEC)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"age": wire.MAX_AGE + 1}, "'age'"),
        ({"age": -1}, "'age'"),
        ({"samples": 2**60}, "'samples'"),
        ({"weight": float("nan")}, "'weight'"),
        ({"weight": 0.0}, "'weight'"),
        ({"sender": ""}, "'sender'"),
        ({"port": 0}, "'port'"),
        ({"xid": "nope"}, "'xid'"),
        ({"params": {"w": np.array([[np.inf, 0], [0, 0], [0, 0]], "<f4"), "b": np.zeros(2, "<f4")}}, "NaN or Inf"),
    ],
)
def test_a_node_never_encodes_a_message_it_would_refuse(change, fragment):
    import dataclasses

    msg = dataclasses.replace(wire.GossipMessage("a", 1, good_params(), xid=wire.new_xid()), **change)
    with pytest.raises(wire.WireError, match=fragment):
        wire.encode(msg)


@settings(max_examples=100, deadline=None)
@given(
    age=st.integers(-(2**64), 2**65),
    samples=st.none() | st.integers(-(2**64), 2**65),
    weight=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_encode_accepts_exactly_what_decode_accepts(age, samples, weight):
    msg = wire.GossipMessage("a", age, good_params(), samples=samples, weight=weight, xid=wire.new_xid())
    body = {**raw(), "age": age, "xid": msg.xid}
    for key, value in (("samples", samples), ("weight", weight)):
        if value is not None:
            body[key] = value
    try:
        packed = pack(body)
    except OverflowError:  # beyond msgpack's integers: nothing could send it
        return
    try:
        wire.decode(packed, SPEC)
        decodable = True
    except wire.WireError:
        decodable = False
    try:
        encoded = wire.encode(msg)
    except wire.WireError:
        assert not decodable
    else:
        assert decodable and wire.decode(encoded, SPEC).age == age


def test_state_digest_tells_models_apart():
    a = good_params()
    b = {**a, "b": np.array([0.5, -1.5], "<f4")}
    assert wire.state_digest(a) == wire.state_digest({k: v.copy() for k, v in a.items()})
    assert wire.state_digest(a) != wire.state_digest(b) and len(wire.state_digest(a)) == 12


def test_digests_are_part_of_the_contract():
    """Nodes compare these over mDNS and /v1/status: a change here splits a cluster of mixed versions."""
    from gossipfl.learning.learner import build_seeded, gossiped_tensors
    from gossipfl.learning.tasks.digits import DigitsTask

    state = {k: v.detach().numpy() for k, v in gossiped_tensors(build_seeded(DigitsTask().build_model, 0)).items()}
    assert wire.spec_digest(wire.spec_of(state)) == "d7e891428c21"  # names, dtypes and shapes only
    fixed = {"w": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.array([0.5, -1.0], "<f4")}
    assert wire.state_digest(fixed) == "d6c5c9c41b86"
    assert wire.state_digest(fixed) != wire.state_digest({**fixed, "w": fixed["w"].reshape(3, 2)})


def test_the_mdns_protocol_field_is_the_wire_version():
    """Discovery may not import the protocol layer, so it states the version itself: they must agree."""
    from gossipfl.discovery.identity import PROTO

    assert PROTO == str(wire.PROTOCOL_VERSION)


def test_the_size_limit_covers_many_long_names():
    """The 413 limit must hold for models with many small tensors and long names (the per-tensor and
    per-name allowances both count)."""
    names = [f"layer{i:03d}." + "n" * 480 for i in range(40)]
    params = {n: np.zeros(1, "<f4") for n in names}
    spec = wire.spec_of(params)
    body = wire.encode(
        wire.GossipMessage("x" * 63, wire.MAX_AGE, params, task="t" * 100, xid=wire.new_xid(), samples=2**53)
    )
    assert len(body) <= wire.max_message_size(spec) <= len(body) + 4096 + 40 * 512


def test_arrays_in_any_memory_order_are_sent_as_c_order():
    w = np.asfortranarray(np.arange(6, dtype="<f4").reshape(3, 2))
    assert not w.flags.c_contiguous
    msg = wire.decode(wire.encode(wire.GossipMessage("a", 1, {"w": w, "b": good_params()["b"]})), SPEC)
    np.testing.assert_array_equal(msg.params["w"], w)


def test_cluster_and_xid_are_decoded():
    xid = wire.new_xid()
    msg = wire.decode(wire.encode(wire.GossipMessage("a", 1, good_params(), cluster="blue", xid=xid)), SPEC)
    assert (msg.cluster, msg.xid) == ("blue", xid)
    assert wire.decode(pack(raw()), SPEC).cluster is None
    with pytest.raises(wire.WireError, match="^message: field 'cluster' must be str$"):
        wire.decode(pack(raw(cluster=3)), SPEC)


def test_map_keys_must_be_strings():
    with pytest.raises(wire.WireError, match="^malformed msgpack: map key at offset [0-9]+ is not a string$"):
        wire.decode(pack({**raw(), 7: "x"}), SPEC)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (pack([1]), "message must be a msgpack map"),
        (pack({k: v for k, v in raw().items() if k != "age"}), "message: missing field 'age'"),
        (tensor_body(dtype=5), "parameter 'w': field 'dtype' must be str"),
        (tensor_body(shape="3x2"), "parameter 'w': field 'shape' must be list"),
        (tensor_body(data=[1]), "parameter 'w': field 'data' must be bytes"),
        (pack(raw({"w": good_params()["w"]})), "missing parameters: b"),
        (pack(raw({**good_params(), "x": np.zeros(1, "<f4"), "y": np.zeros(1, "<f4")})), "unknown parameters: x, y"),
        (pack(raw(port=0)), "field 'port' must be from 1 to 65535"),
        (pack(raw(xid="z")), "field 'xid' must be 32 lowercase hex digits"),
    ],
)
def test_errors_name_the_problem_exactly(body, message):
    with pytest.raises(wire.WireError) as e:
        wire.decode(body, SPEC)
    assert str(e.value) == message


def test_two_missing_parameters_are_listed_with_commas():
    spec = {**SPEC, "c": wire.TensorSpec("<f4", (1,))}
    with pytest.raises(wire.WireError) as e:
        wire.decode(pack(raw({"w": good_params()["w"]})), spec)
    assert str(e.value) == "missing parameters: b, c"


@pytest.mark.parametrize(
    "extra",
    [{"samples": 0}, {"weight": 0.5}, {"weight": wire.MAX_WEIGHT}, {"port": 1}, {"port": 65535}],
)
def test_bounds_are_inclusive_where_documented(extra):
    wire.decode(pack(raw(**extra)), SPEC)
    wire.encode(wire.GossipMessage("a", 1, good_params(), **extra))


def test_port_65536_is_refused():
    with pytest.raises(wire.WireError, match="'port'"):
        wire.decode(pack(raw(port=65536)), SPEC)

"""The zero-copy msgpack reader against msgpack-python: the same values for what both accept, and nothing
accepted that msgpack-python refuses; only ValueError on bad input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossipfl.common import msgview

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def plain(v: object) -> object:
    if isinstance(v, (memoryview, bytes)):
        return ("bin", bytes(v))
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_every_value_reads_back_as_msgpack_python_reads_it(value):
    body = msgpack.packb(value, use_bin_type=True)
    assert plain(msgview.loads(body)) == plain(msgpack.unpackb(body, raw=False, strict_map_key=True))


@settings(max_examples=500, deadline=None)
@given(
    value=values, edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255)), max_size=3)
)
def test_mutated_bodies_are_read_as_msgpack_python_reads_them_or_refused_with_valueerror(value, edits):
    body = bytearray(msgpack.packb(value, use_bin_type=True))
    for op, where, byte in edits:
        at = where % (len(body) + 1)
        if op == 0 and body:
            body[at % len(body)] = byte
        elif op == 1:
            del body[at:]
        else:
            body.insert(at, byte)
    try:
        ours = msgview.loads(bytes(body))
    except ValueError:
        return  # refused: msgpack-python may accept it (repeated keys, deeper nesting, extension types)
    theirs = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True)  # must accept what we accept
    # compared packed again (NaN is not equal to itself; the same bytes give the same NaN)
    assert msgpack.packb(unview(ours), use_bin_type=True) == msgpack.packb(theirs, use_bin_type=True)


def unview(v: object) -> object:
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, list):
        return [unview(x) for x in v]
    if isinstance(v, dict):
        return {k: unview(x) for k, x in v.items()}
    return v


def test_bin_values_are_views_into_the_body():
    body = bytearray(msgpack.packb({"data": b"\x01" * 5000}, use_bin_type=True))
    data = msgview.loads(body)["data"]
    assert isinstance(data, memoryview) and not data.readonly
    data[0] = 7
    assert 7 in body  # the same memory


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x82\xa1a\x01\xa1a\x02", "map key 'a' repeated"),  # msgpack-python keeps the last
        (b"\x91" * 33 + b"\xc0", "nested deeper than 32"),
        (b"\xd4\x01\x00", "type 0xd4"),  # an extension type
        (b"\x81\x01\x02", "map key at offset 1 is not a string"),
        (b"\xc0\xc0", "1 bytes after the msgpack value"),
        (b"\xc6\xff\xff\xff\xff\x00", "truncated at offset 5"),  # a bin of 4 GiB in a 6-byte body
        (b"\xdd\xff\xff\xff\xff", "truncated"),  # an array of 2**32 elements: no list is built
        (b"\xa2\xff\xfe", "invalid UTF-8"),
    ],
)
def test_what_msgpack_python_would_take_or_crash_on_is_a_valueerror(body, message):
    with pytest.raises(ValueError, match=message):
        msgview.loads(body)
    assert plain(msgview.loads(b"\x91" * 32 + b"\xc0")) is not None  # 32 levels are fine

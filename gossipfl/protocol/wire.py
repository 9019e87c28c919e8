"""Wire codec for gossip messages (msgpack, never pickle).

A message is a msgpack map::

    {"v": 2, "sender": str, "age": int, "params": {name: {"dtype": "<f4", "shape": [..], "data": bin}},
     optional: "xid": str (the exchange's id, 32 hex digits; every message of an exchange carries it),
               "task": str, "merge": str (rule name), "samples": int (sender's local data size),
               "weight": float (push-sum weight), "cluster": str,
               "port": int (the sender's HTTP port: the receiver can reach it at its source address)}

``params`` holds the model's gossiped state: its parameters and its floating-point buffers (BatchNorm
running statistics). Protocol 2 added ``xid`` and the buffers, and bounded ``age`` and ``samples`` to 2**53;
a protocol-1 node gets a 400 naming the version, and mDNS keeps the two apart.

Version 3 is version 2 with compression (compress.py): the message declares ``"compress": NAME`` and each
tensor map carries that codec's fields instead of (or besides) ``data``: ``fp16``/``bf16`` ``data`` of 2
bytes per value, ``int8`` ``data`` and ``scale``, ``topk`` ``idx`` and ``data`` (in a reply to a top-k
message, ``data`` alone: the values at the indices of the message it answers). A message without
compression is still sent as version 2, field for field what a 0.1 node sends and reads, so nodes of both
releases exchange; a 0.1 node answers a compressed message with a 400 naming version 3.

Tensors go out as msgpack ``bin`` straight from their memory (``encode`` returns the pieces of the body,
never joined, see common/chunks.py) and are read back as views into the received body (common/msgview.py):
an uncompressed tensor is never copied between the socket's buffer and the merge.

``decode`` validates everything against the receiver's :data:`ModelSpec` and raises :class:`WireError`
with a message naming the problem; ``encode`` checks the same bounds, so a node never sends a message
that it would itself refuse. Nothing here touches a model.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

import msgpack
import numpy as np

from gossipfl.common import msgview
from gossipfl.common.chunks import Chunks
from gossipfl.protocol import compress
from gossipfl.protocol.compress import Codec

PROTOCOL_VERSION = 2  # what a node announces (mDNS, status): the uncompressed format, which every node reads
COMPRESSED_VERSION = 3
CONTENT_TYPE = "application/msgpack"
MAX_SENDER_LEN = 255
MAX_WEIGHT = 1e15  # push-sum weights start at a sample count and are only ever averaged
MAX_AGE = 2**53  # ages and sample counts stay exact as float64 merge weights
MAX_SAMPLES = 2**53
XID_RE = re.compile(r"\A[0-9a-f]{32}\Z")  # (not "$": it matches before a final newline too)
_PER_TENSOR_OVERHEAD = 512  # name, keys, dtype string and shape list, generously
_MESSAGE_OVERHEAD = 4096


class WireError(ValueError):
    """The message is malformed or does not fit the receiver's model."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy dtype string with byte order, e.g. "<f4"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


ModelSpec = Mapping[str, TensorSpec]
Params = Mapping[str, np.ndarray]
T = TypeVar("T")


@dataclass(frozen=True)
class GossipMessage:
    sender: str
    age: int
    params: Params
    task: str | None = None
    merge: str | None = None
    samples: int | None = None
    weight: float | None = None
    cluster: str | None = None
    port: int | None = None
    xid: str | None = None
    compress: str = "none"  # the codec the tensors were sent with (decoded: ``params`` are the values)
    # top-k: per tensor, the flat indices that ``params`` (1-d, the values there) are at; None: dense
    index: Mapping[str, np.ndarray | None] | None = None  # (None for a tensor sent whole: see ``exact``)


NONE = compress.NoCompression()


def all_finite(a: np.ndarray, block: int = 1 << 16) -> bool:
    """No NaN or Inf in ``a`` (True for non-float arrays), checked block by block: no temporary array of the
    tensor's size (for a large model, its fresh pages cost more than the check)."""
    if a.dtype.kind not in "fc":
        return True
    flat = a.reshape(-1)
    scratch = np.empty(min(block, flat.size), bool)
    for start in range(0, flat.size, block):
        part = flat[start : start + block]
        if not np.isfinite(part, out=scratch[: part.size]).all():
            return False
    return True


def new_xid() -> str:
    """A fresh exchange id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def spec_of(params: Params) -> dict[str, TensorSpec]:
    return {name: TensorSpec(np.asarray(a).dtype.str, tuple(np.shape(a))) for name, a in params.items()}


def spec_digest(spec: ModelSpec) -> str:
    """A short fingerprint of a model's parameter names, dtypes and shapes (for mDNS TXT and status):
    peers whose digests differ cannot merge models."""
    import hashlib

    canon = ";".join(f"{n}:{t.dtype}:{'x'.join(map(str, t.shape))}" for n, t in sorted(spec.items()))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def state_digest(params: Params) -> str:
    """A short fingerprint of a model's values (names, dtypes, shapes and bytes): nodes that must start
    from the same initial model compare it."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name}:{a.dtype.str}:{'x'.join(map(str, a.shape))};".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:12]


def max_message_size(spec: ModelSpec) -> int:
    """Largest body a valid message for this model can need: uncompressed, or top-k of half of each tensor
    (compress.MAX_TOPK_FRACTION), whichever is larger."""
    total = _MESSAGE_OVERHEAD
    for name, t in spec.items():
        n = int(np.prod(t.shape, dtype=np.int64))
        topk = (n // 2 + 1) * (compress.INDEX_DTYPE.itemsize + np.dtype(t.dtype).itemsize)
        total += max(t.nbytes, topk) + _PER_TENSOR_OVERHEAD + len(name)
    return total


class _Body:
    """A msgpack body built as pieces: small heads packed together, large ``bin`` values left where they are."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)
        self.parts: list[object] = []
        self.head = bytearray()

    def pack(self, value: object) -> None:
        self.head += self.packer.pack(value)

    def map_header(self, n: int) -> None:
        self.head += self.packer.pack_map_header(n)

    def binary(self, a: np.ndarray) -> None:
        data = memoryview(a.reshape(-1).view(np.uint8))
        n = data.nbytes
        if n >= 2**32:
            raise WireError(f"a tensor of {n} bytes is beyond msgpack's bin (4 GiB)")
        self.head += bytes([0xC4, n]) if n < 256 else (b"\xc5" if n < 65536 else b"\xc6")
        if n >= 256:
            self.head += n.to_bytes(2 if n < 65536 else 4, "big")
        if n <= 4096:  # small: copied into the head, fewer pieces
            self.head += data
            return
        self.parts += [bytes(self.head), data]
        self.head = bytearray()

    def chunks(self) -> Chunks:
        return Chunks([*self.parts, bytes(self.head)])


def encode(
    msg: GossipMessage,
    codec: Codec = NONE,
    *,
    send_index: bool = True,
    spec: ModelSpec | None = None,
    exact: Collection[str] = (),
) -> Chunks:
    """The message as msgpack, in pieces (``Chunks``): tensors are not copied unless a codec transforms them.
    ``msg.params`` are the full tensors (compressed here with ``codec``), or with ``msg.index`` the values at
    those indices (top-k: ``idx`` goes out when ``send_index``, a reply leaves it out; ``spec`` gives the
    shapes to declare). The tensors named in ``exact`` go whole and uncompressed whatever the codec (a
    model's statistics, see core.py; the receiver decodes them so with the same names). Raises WireError
    for a message that ``decode`` would refuse (an age out of range, a weight that is not finite,
    parameters with NaN or Inf)."""
    _check_scalars(msg.sender, msg.age, msg.samples, msg.weight, msg.port, msg.xid)
    name = "topk" if msg.index is not None else codec.name
    fields: dict[str, object] = {"v": PROTOCOL_VERSION if name == "none" else COMPRESSED_VERSION}
    fields.update(sender=msg.sender, age=int(msg.age))
    for key in ("xid", "task", "merge", "samples", "weight", "cluster", "port"):
        if (value := getattr(msg, key)) is not None:
            fields[key] = value
    if name != "none":
        fields["compress"] = name
    body = _Body()
    body.map_header(len(fields) + 1)
    for key, value in fields.items():
        body.pack(key)
        body.pack(value)
    body.pack("params")
    body.map_header(len(msg.params))
    for tensor, arr in msg.params.items():
        a = np.asarray(arr)
        if not all_finite(a):
            raise WireError(f"parameter {tensor!r}: contains NaN or Inf")
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            a = a.copy(order="C")
        if tensor in exact:
            flat, shape = {"data": a}, a.shape
        elif msg.index is not None:
            flat = {"idx": msg.index[tensor], "data": a} if send_index else {"data": a}
            assert spec is not None, "a top-k message declares the shapes of the whole tensors"
            shape: tuple[int, ...] = spec[tensor].shape
        else:
            flat, shape = codec.encode(a.reshape(-1)), a.shape
        body.pack(tensor)
        body.map_header(2 + len(flat))
        body.pack("dtype")
        body.pack(a.dtype.str)
        body.pack("shape")
        body.pack(list(shape))
        for key, value in flat.items():
            body.pack(key)
            body.binary(np.ascontiguousarray(value))
    return body.chunks()


def _field(obj: Mapping, key: str, kind: type[T], where: str = "message") -> T:
    if key not in obj:
        raise WireError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int and (type(value) is not int):
        raise WireError(f"{where}: field {key!r} must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise WireError(f"{where}: field {key!r} must be {kind.__name__}")
    return value


def _optional(obj: Mapping, key: str, kind: type[T]) -> T | None:
    """An optional field: None when absent; ints are accepted where a float is expected."""
    if key not in obj:
        return None
    value = obj[key]
    if kind is float and type(value) is int:
        return float(value)  # type: ignore[return-value]
    return _field(obj, key, kind)


def _decode_tensor(
    name: str, obj: object, expected: TensorSpec, codec: Codec, at: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, indices): a dense tensor and None, or a top-k tensor's values and indices (``at``: the
    indices of the message this one answers, which then carries no ``idx``)."""
    where = f"parameter {name!r}"
    if not isinstance(obj, dict):
        raise WireError(f"{where}: must be a map with dtype, shape, data")
    dtype = _field(obj, "dtype", str, where)
    shape = _field(obj, "shape", list, where)
    if dtype != expected.dtype:
        raise WireError(f"{where}: dtype {dtype!r}, expected {expected.dtype!r}")
    if not all(type(d) is int for d in shape):  # (not shown: a list nested 1,000 deep has no repr)
        raise WireError(f"{where}: shape must be a list of integers, expected {list(expected.shape)}")
    if tuple(shape) != expected.shape:
        shown = shape if len(shape) <= 8 else f"of {len(shape)} dimensions"
        raise WireError(f"{where}: shape {shown}, expected {list(expected.shape)}")
    n = int(np.prod(expected.shape, dtype=np.int64))
    try:
        if isinstance(codec, compress.TopK):
            if at is None:
                index = compress.decode_indices(obj, n)
            else:  # (an ``idx`` in a reply is ignored, as any field a codec does not read)
                index = at
            arr = compress.decode_values(obj, np.dtype(dtype), index.size)
        else:
            index = None
            arr = codec.decode(obj, np.dtype(dtype), n).reshape(expected.shape)
    except ValueError as e:
        raise WireError(f"{where}: {e}") from None
    if not all_finite(arr):
        raise WireError(f"{where}: contains NaN or Inf")
    return arr, index


def unpack_map(body: bytes) -> dict:
    """A message body's msgpack map (string keys only, no extension types); WireError otherwise."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated exception types on bad input
        raise WireError(f"malformed msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("message must be a msgpack map")
    return obj


def decode(
    body: bytes | bytearray | memoryview | Chunks,
    spec: ModelSpec,
    task: str | None = None,
    *,
    at: Mapping[str, np.ndarray | None] | None = None,
    reply: bool = False,
    exact: Collection[str] = (),
) -> GossipMessage:
    """Parse and validate a message for a model with ``spec``; raise WireError naming the problem. The
    tensors of an uncompressed message are views into ``body`` (writable when it is a bytearray); ``at``:
    the indices of the top-k message this one answers (it must then be top-k, without ``idx``); ``reply``: it
    answers a message that was not top-k (so it may not be top-k either); ``exact``: tensors sent whole and
    uncompressed in any message (see ``encode``)."""
    if isinstance(body, Chunks):  # a message made here (tests, a node reading its own): joined once
        body = body.tobytes()
    try:
        obj = msgview.loads(body)
    except ValueError as e:
        raise WireError(f"malformed msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("message must be a msgpack map")
    version = _field(obj, "v", int)
    if version not in (PROTOCOL_VERSION, COMPRESSED_VERSION):
        raise WireError(f"unsupported protocol version {version}, this node speaks 2 and 3")
    name = _optional(obj, "compress", str) or "none"
    if (name != "none") != (version == COMPRESSED_VERSION):
        raise WireError(f"compression {name[:40]!r} in a message of version {version}")
    try:
        codec = compress.for_wire(name)
    except ValueError as e:
        raise WireError(str(e)) from None
    if at is not None and name != "topk":
        raise WireError(f"a reply to a top-k message must be top-k, not {name[:40]!r}")
    if reply and at is None and name == "topk":
        raise WireError("a top-k reply to a message that was not top-k")
    sender = _field(obj, "sender", str)
    age = _field(obj, "age", int)
    msg_task, rule, cluster = _optional(obj, "task", str), _optional(obj, "merge", str), _optional(obj, "cluster", str)
    if msg_task is not None and task is not None and msg_task != task:
        raise WireError(f"task {msg_task!r} does not match this node's task {task!r}")
    samples = _optional(obj, "samples", int)
    weight = _optional(obj, "weight", float)
    port = _optional(obj, "port", int)
    xid = _optional(obj, "xid", str)
    _check_scalars(sender, age, samples, weight, port, xid)
    params = _field(obj, "params", dict)
    missing = sorted(set(spec) - set(params))
    unknown = sorted(set(params) - set(spec), key=str)
    if missing:
        raise WireError(f"missing parameters: {', '.join(missing)}")
    if unknown:
        raise WireError(f"unknown parameters: {', '.join(map(str, unknown))}")
    decoded, index = {}, {}
    for n in spec:
        own = NONE if n in exact else codec
        decoded[n], index[n] = _decode_tensor(n, params[n], spec[n], own, at.get(n) if at is not None else None)
    return GossipMessage(
        sender, age, decoded, msg_task, rule, samples, weight, cluster=cluster, port=port, xid=xid,
        compress=name, index=index if name == "topk" else None,
    )  # fmt: skip


def _check_scalars(
    sender: str, age: int, samples: int | None, weight: float | None, port: int | None, xid: str | None
) -> None:
    """The bounds of every scalar field, shared by encode and decode."""
    if not 0 < len(sender) <= MAX_SENDER_LEN:
        raise WireError(f"field 'sender' must have 1 to {MAX_SENDER_LEN} characters")
    if not 0 <= age <= MAX_AGE:
        raise WireError(f"field 'age' must be an integer from 0 to 2**53, got {age}")
    if samples is not None and not 0 <= samples <= MAX_SAMPLES:
        raise WireError(f"field 'samples' must be an integer from 0 to 2**53, got {samples}")
    if weight is not None and not (np.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise WireError(f"field 'weight' must be a positive finite number of at most {MAX_WEIGHT:g}")
    if port is not None and not 0 < port < 65536:
        raise WireError("field 'port' must be from 1 to 65535")
    if xid is not None and not XID_RE.match(xid):
        raise WireError("field 'xid' must be 32 lowercase hex digits")

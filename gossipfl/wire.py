"""Wire codec for gossip messages (msgpack, never pickle).

A message is a msgpack map::

    {"v": 1, "sender": str, "age": int, "params": {name: {"dtype": "<f4", "shape": [..], "data": bin}},
     optional: "task": str, "merge": str (rule name), "samples": int (sender's local data size),
               "weight": float (push-sum weight), "cluster": str,
               "port": int (the sender's HTTP port: the receiver can reach it at its source address)}

``decode`` validates everything against the receiver's :data:`ModelSpec` and raises :class:`WireError`
with a message naming the problem; nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"
MAX_SENDER_LEN = 255
MAX_WEIGHT = 1e15  # push-sum weights start at a sample count and are only ever averaged
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


def spec_of(params: Params) -> dict[str, TensorSpec]:
    return {name: TensorSpec(np.asarray(a).dtype.str, tuple(np.shape(a))) for name, a in params.items()}


def spec_digest(spec: ModelSpec) -> str:
    """A short fingerprint of a model's parameter names, dtypes and shapes (for mDNS TXT and status):
    peers whose digests differ cannot merge models."""
    import hashlib

    canon = ";".join(f"{n}:{t.dtype}:{'x'.join(map(str, t.shape))}" for n, t in sorted(spec.items()))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def max_message_size(spec: ModelSpec) -> int:
    """Largest body a valid message for this model can need."""
    return _MESSAGE_OVERHEAD + sum(t.nbytes + _PER_TENSOR_OVERHEAD + len(n) for n, t in spec.items())


def encode(msg: GossipMessage) -> bytes:
    params = {}
    for name, arr in msg.params.items():
        a = np.asarray(arr)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            a = a.copy(order="C")
        data = memoryview(a.reshape(-1).view(np.uint8))
        params[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "data": data}
    body: dict[str, object] = {"v": PROTOCOL_VERSION, "sender": msg.sender, "age": int(msg.age), "params": params}
    for key in ("task", "merge", "samples", "weight", "cluster", "port"):
        if (value := getattr(msg, key)) is not None:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


def _field(obj: Mapping, key: str, kind: type, where: str = "message") -> object:
    if key not in obj:
        raise WireError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int and (type(value) is not int):
        raise WireError(f"{where}: field {key!r} must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise WireError(f"{where}: field {key!r} must be {kind.__name__}")
    return value


def _optional(obj: Mapping, key: str, kind: type) -> object:
    """An optional field: None when absent; ints are accepted where a float is expected."""
    if key not in obj:
        return None
    value = obj[key]
    if kind is float and type(value) is int:
        return float(value)
    return _field(obj, key, kind)


def _decode_tensor(name: str, obj: object, expected: TensorSpec) -> np.ndarray:
    where = f"parameter {name!r}"
    if not isinstance(obj, dict):
        raise WireError(f"{where}: must be a map with dtype, shape, data")
    dtype = _field(obj, "dtype", str, where)
    shape = _field(obj, "shape", list, where)
    data = _field(obj, "data", bytes, where)
    if dtype != expected.dtype:
        raise WireError(f"{where}: dtype {dtype!r}, expected {expected.dtype!r}")
    if not all(type(d) is int for d in shape) or tuple(shape) != expected.shape:
        raise WireError(f"{where}: shape {shape}, expected {list(expected.shape)}")
    if len(data) != expected.nbytes:
        raise WireError(f"{where}: {len(data)} data bytes, expected {expected.nbytes}")
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(expected.shape)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise WireError(f"{where}: contains NaN or Inf")
    return arr


def decode(body: bytes, spec: ModelSpec, task: str | None = None) -> GossipMessage:
    """Parse and validate a message for a model with ``spec``; raise WireError naming the problem."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated exception types on bad input
        raise WireError(f"malformed msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("message must be a msgpack map")
    version = _field(obj, "v", int)
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version}, this node speaks {PROTOCOL_VERSION}")
    sender = _field(obj, "sender", str)
    if not 0 < len(sender) <= MAX_SENDER_LEN:
        raise WireError(f"field 'sender' must have 1 to {MAX_SENDER_LEN} characters")
    age = _field(obj, "age", int)
    if not 0 <= age < 2**63:
        raise WireError("field 'age' must be a non-negative 64-bit integer")
    msg_task, rule, cluster = _optional(obj, "task", str), _optional(obj, "merge", str), _optional(obj, "cluster", str)
    if msg_task is not None and task is not None and msg_task != task:
        raise WireError(f"task {msg_task!r} does not match this node's task {task!r}")
    samples = _optional(obj, "samples", int)
    if samples is not None and samples < 0:
        raise WireError("field 'samples' must be a non-negative integer")
    weight = _optional(obj, "weight", float)
    if weight is not None and not (np.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise WireError(f"field 'weight' must be a positive finite number of at most {MAX_WEIGHT:g}")
    port = _optional(obj, "port", int)
    if port is not None and not 0 < port < 65536:
        raise WireError("field 'port' must be from 1 to 65535")
    params = _field(obj, "params", dict)
    missing = sorted(set(spec) - set(params))
    unknown = sorted(set(params) - set(spec), key=str)
    if missing:
        raise WireError(f"missing parameters: {', '.join(missing)}")
    if unknown:
        raise WireError(f"unknown parameters: {', '.join(map(str, unknown))}")
    decoded = {name: _decode_tensor(name, params[name], spec[name]) for name in spec}
    return GossipMessage(
        sender, age, decoded, task=msg_task, merge=rule, samples=samples, weight=weight, cluster=cluster, port=port
    )

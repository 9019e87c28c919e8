"""Wire codec of secure group rounds (msgpack, never pickle), and the flat vector a model becomes.

Every message is a msgpack map with ``"v": 1``, ``"round"`` (the round id, 32 hex digits) and ``"sender"``:

- invite (``POST /v1/group``, from the initiator): ``members`` (the K ids, the initiator first), ``cluster``,
  ``task``, ``model`` (the spec digest), ``n`` (coordinates), ``port`` (optional: the initiator's HTTP port);
- joined (a member's reply): ``key`` (its X25519 public key for this round, 32 bytes), ``age``; under mutual
  TLS also ``proof``: ``{"sig": bin, "cert": bin}``, its signature of the key and its certificate (DER), which
  bind the key to it (``security/keybinding.py``);
- keys (``POST /v1/group/{round}/mask``, from the initiator): ``keys``, every member's, in ``members`` order;
  under mutual TLS also ``proofs``, every member's proof in the same order (the initiator's included);
- masked (a member's reply): ``vector``: ``{"dtype": "<u8", "shape": [n], "data": bin}``, its masked model;
- commit (``POST /v1/group/{round}/commit``, from the initiator): ``sum`` (the masked vectors' sum, as a
  ``vector``), ``age``;
- hello (``POST /v1/group/hello``, no ``round``): ``port``: a node that knows too few peers to start a round
  tells one it knows where to reach it (the peer then identifies it as it does any inbound caller).

``decode_*`` check everything against what the receiver expects and raise ``WireError`` naming the problem;
``encode_*`` build exactly what they accept. A model travels as one vector: its tensors flattened in the order
of the model's spec (``flatten``), each coordinate in fixed point modulo 2**64 (``security/masking.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from gossipfl.protocol.wire import MAX_AGE, MAX_SENDER_LEN, ModelSpec, Params, WireError, unpack_map
from gossipfl.security.keybinding import MAX_CERT_BYTES, MAX_SIG_BYTES, Proof
from gossipfl.security.masking import KEY_BYTES, MAX_COORDINATES, MAX_MEMBERS, MIN_MEMBERS

GROUP_VERSION = 1
ROUND_RE = re.compile(r"\A[0-9a-f]{32}\Z")
VECTOR_DTYPE = "<u8"
# everything in a message but its vector: the members, their keys and their proofs
OVERHEAD = 4096 + MAX_MEMBERS * (MAX_SENDER_LEN + KEY_BYTES + MAX_CERT_BYTES + MAX_SIG_BYTES + 64)


@dataclass(frozen=True)
class Invite:
    round: str
    sender: str
    members: tuple[str, ...]
    cluster: str
    task: str
    model: str
    n: int
    port: int | None = None


@dataclass(frozen=True)
class Joined:
    round: str
    sender: str
    key: bytes
    age: int
    proof: Proof | None = None  # under mutual TLS: what binds the key to the sender


@dataclass(frozen=True)
class Keys:
    round: str
    sender: str
    keys: tuple[bytes, ...]
    proofs: tuple[Proof, ...] | None = None  # under mutual TLS: every member's, in ``members`` order


@dataclass(frozen=True)
class Vector:
    """A masked vector (a member's reply) or the sum of a round's (the commit)."""

    round: str
    sender: str
    data: np.ndarray  # uint64, n coordinates
    age: int | None = None  # the commit's: the group's age


def max_size(n: int) -> int:
    """The largest group message for a model of ``n`` coordinates."""
    return OVERHEAD + 8 * n


def flatten(params: Params, spec: ModelSpec) -> np.ndarray:
    """The model as one float64 vector, tensors in ``spec`` order."""
    return np.concatenate([np.asarray(params[name], dtype=np.float64).reshape(-1) for name in spec])


def unflatten(vector: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
    """``flatten`` undone: each tensor in its shape and dtype."""
    out, at = {}, 0
    for name, t in spec.items():
        size = int(np.prod(t.shape, dtype=np.int64))
        out[name] = vector[at : at + size].reshape(t.shape).astype(np.dtype(t.dtype))
        at += size
    if at != vector.size:
        raise ValueError(f"a vector of {vector.size} coordinates for a model of {at}")
    return out


def size_of(spec: ModelSpec) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in spec.values())


def _pack(round_id: str, sender: str, **fields: object) -> bytes:
    return msgpack.packb({"v": GROUP_VERSION, "round": round_id, "sender": sender, **fields}, use_bin_type=True)


def _vector(v: np.ndarray) -> dict[str, object]:
    a = np.ascontiguousarray(v, dtype="<u8")
    return {"dtype": VECTOR_DTYPE, "shape": [int(a.size)], "data": a.tobytes()}


def encode_invite(m: Invite) -> bytes:
    port = {} if m.port is None else {"port": m.port}
    text = {"cluster": m.cluster, "task": m.task, "model": m.model}
    return _pack(m.round, m.sender, members=list(m.members), n=m.n, **text, **port)


def encode_hello(sender: str, port: int) -> bytes:
    return msgpack.packb({"v": GROUP_VERSION, "sender": sender, "port": port}, use_bin_type=True)


def decode_hello(body: bytes) -> tuple[str, int]:
    """(sender, port) of a hello."""
    obj = _open(body, None, round_field=False)
    return obj["sender"], _port(obj)


def _proof(p: Proof) -> dict[str, bytes]:
    return {"sig": p.sig, "cert": p.cert}


def encode_joined(m: Joined) -> bytes:
    proof = {} if m.proof is None else {"proof": _proof(m.proof)}
    return _pack(m.round, m.sender, key=m.key, age=m.age, **proof)


def encode_keys(m: Keys) -> bytes:
    proofs = {} if m.proofs is None else {"proofs": [_proof(p) for p in m.proofs]}
    return _pack(m.round, m.sender, keys=list(m.keys), **proofs)


def encode_vector(m: Vector) -> bytes:
    if m.age is None:
        return _pack(m.round, m.sender, vector=_vector(m.data))
    return _pack(m.round, m.sender, sum=_vector(m.data), age=m.age)


def _open(body: bytes, round_id: str | None, round_field: bool = True) -> dict:
    """The message's map, with a valid version, round id (``round_id`` when given) and sender."""
    obj = unpack_map(body)
    if _get(obj, "v", int) != GROUP_VERSION:
        raise WireError(f"unsupported group protocol version {obj['v']}, this node speaks {GROUP_VERSION}")
    if round_field:
        rid = _get(obj, "round", str)
        if not ROUND_RE.match(rid):
            raise WireError("field 'round' must be 32 lowercase hex digits")
        if round_id is not None and rid != round_id:
            raise WireError(f"round {rid} in the message, {round_id} expected")
    sender = _get(obj, "sender", str)
    if not 0 < len(sender) <= MAX_SENDER_LEN:
        raise WireError(f"field 'sender' must have 1 to {MAX_SENDER_LEN} characters")
    return obj


def _get(obj: dict, key: str, kind: type) -> Any:
    if key not in obj:
        raise WireError(f"missing field {key!r}")
    value = obj[key]
    if (kind is int and type(value) is not int) or (kind is not int and not isinstance(value, kind)):
        raise WireError(f"field {key!r} must be {kind.__name__}")
    return value


def _port(obj: dict) -> int:
    port = _get(obj, "port", int)
    if not 0 < port < 65536:
        raise WireError("field 'port' must be from 1 to 65535")
    return port


def _age(obj: dict) -> int:
    age = _get(obj, "age", int)
    if not 0 <= age <= MAX_AGE:
        raise WireError(f"field 'age' must be an integer from 0 to 2**53, got {age}")
    return age


def decode_invite(body: bytes) -> Invite:
    obj = _open(body, None)
    members = _get(obj, "members", list)
    if not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
        raise WireError(f"a group has {MIN_MEMBERS} to {MAX_MEMBERS} members, this one {len(members)}")
    if not all(isinstance(i, str) and 0 < len(i) <= MAX_SENDER_LEN for i in members):
        raise WireError("field 'members' must be a list of node ids")
    if len(set(members)) != len(members):
        raise WireError("a member is listed twice")
    if members[0] != obj["sender"]:
        raise WireError("the initiator must be the first member")
    n = _get(obj, "n", int)
    if not 0 < n <= MAX_COORDINATES:
        raise WireError(f"field 'n' must be a count of coordinates from 1 to {MAX_COORDINATES}")
    text = {k: _get(obj, k, str) for k in ("cluster", "task", "model")}
    port = _port(obj) if "port" in obj else None
    return Invite(obj["round"], obj["sender"], tuple(members), n=n, port=port, **text)


def decode_joined(body: bytes, round_id: str) -> Joined:
    obj = _open(body, round_id)
    key = _get(obj, "key", bytes)
    if len(key) != KEY_BYTES:
        raise WireError(f"field 'key' must be a {KEY_BYTES}-byte X25519 public key")
    proof = _decode_proof(_get(obj, "proof", dict)) if "proof" in obj else None
    return Joined(round_id, obj["sender"], key, _age(obj), proof)


def _decode_proof(v: dict) -> Proof:
    sig, cert = _get(v, "sig", bytes), _get(v, "cert", bytes)
    if not 0 < len(sig) <= MAX_SIG_BYTES or not 0 < len(cert) <= MAX_CERT_BYTES:
        raise WireError(f"a proof has a signature of at most {MAX_SIG_BYTES} bytes, a certificate of {MAX_CERT_BYTES}")
    return Proof(sig, cert)


def decode_keys(body: bytes, round_id: str, members: Sequence[str]) -> Keys:
    obj = _open(body, round_id)
    keys = _get(obj, "keys", list)
    if len(keys) != len(members):
        raise WireError(f"{len(keys)} keys for a group of {len(members)}")
    if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys):
        raise WireError(f"field 'keys' must hold {KEY_BYTES}-byte X25519 public keys")
    proofs = None
    if "proofs" in obj:
        raw = _get(obj, "proofs", list)
        if len(raw) != len(members) or not all(isinstance(p, dict) for p in raw):
            raise WireError(f"field 'proofs' must hold one proof per member ({len(members)})")
        proofs = tuple(_decode_proof(p) for p in raw)
    return Keys(round_id, obj["sender"], tuple(keys), proofs)


def _decode_data(obj: dict, key: str, n: int) -> np.ndarray:
    v = _get(obj, key, dict)
    dtype, shape, data = (_get(v, k, t) for k, t in (("dtype", str), ("shape", list), ("data", bytes)))
    if dtype != VECTOR_DTYPE:
        raise WireError(f"{key}: dtype {dtype!r}, expected {VECTOR_DTYPE!r} (integers modulo 2**64)")
    if shape != [n]:
        raise WireError(f"{key}: shape {shape if len(shape) <= 4 else '...'}, expected [{n}]")
    if len(data) != 8 * n:
        raise WireError(f"{key}: {len(data)} data bytes, expected {8 * n}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def decode_masked(body: bytes, round_id: str, n: int) -> Vector:
    obj = _open(body, round_id)
    return Vector(round_id, obj["sender"], _decode_data(obj, "vector", n))


def decode_commit(body: bytes, round_id: str, n: int) -> Vector:
    obj = _open(body, round_id)
    return Vector(round_id, obj["sender"], _decode_data(obj, "sum", n), _age(obj))

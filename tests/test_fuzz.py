"""Fuzzing every route that takes a body, over real HTTP, against real ``gossipfl node`` processes.

Two nodes run with ``--no-train`` and no peers, so their models can change only through a committed
merge: an open one, and a members-only one (``--secret-file``). Hypothesis draws the requests: arbitrary
bytes, arbitrary msgpack structures, valid gossip messages with fields mutated, valid encodings with
bytes flipped, cut, spliced or duplicated, all signed with the cluster key for the members-only node (an
authenticated member sending junk reaches the decoder) or signed badly (a 401, nothing else); decisions
(``/v1/gossip/{xid}/{commit|abort}``) with ids of every shape and any bodies; Open Inference Protocol
requests (JSON and binary, mutated); and requests whose HTTP framing lies (Content-Length, chunked
encoding, content encodings), sent over a raw socket.

Every answer must be a 4xx or a 200, never a 5xx, a reset or a hang, and the right one where the fuzzer
knows it: each gossip body that reaches the decoder is checked against the wire contract by
``invalid_because`` (written apart from ``protocol/wire.py``), so an invalid message must get a 4xx and a
valid one is prepared (200: the fuzzer aborts it at once; a prepare never changes a model). The model of
each node must be the same afterwards (``GET /v1/model``, and ``age`` and ``merges`` in ``/v1/status``),
and its log free of errors, tracebacks and stray lines.

CI sends a few hundred derandomized requests (``CI_EXAMPLES``), plus the regression tests of the bugs
this fuzzer found; ``benchmarks/fuzz.py`` runs the same generators at scale (10,000+ requests) through
the engine here (``targets``, the strategies, ``Fuzzer``, ``run_kind``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import re
import secrets
import socket
import struct
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gossipfl.security.signing import HEADER, ClusterKey

from .faults import LOOPBACK, NodeProcess, free_port

SENDER = "fuzzer"  # the id the fuzzer signs as, and the sender of its valid messages
OPEN_ID, MEMBER_ID = "fuzz-open", "fuzz-member"
KEY = bytes(range(100, 140))  # the members-only node's cluster key (40 bytes)
OTHER_KEY = bytes(range(140, 180))
VALID_XID = re.compile(r"[0-9a-f]{32}")
PLACEHOLDER = "5eed" * 8  # an xid in a drawn body, replaced by a fresh one when sent (same length)
TIMEOUT_S = 10.0  # per request: no answer within this is a hang
CLOSED = "closed"  # the server closed the connection without an answer (after the client half-closed)
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")  # a record of the node's log: "DATE TIME LEVEL"


# -- the targets ----------------------------------------------------------------------------------
@dataclass
class Target:
    """One node under fuzz: its process, the key it wants (None: open) and a valid message for it."""

    name: str  # "open" or "member"
    node_id: str
    proc: NodeProcess
    key: bytes | None
    template: dict[str, Any] = field(default_factory=dict)  # a valid gossip message as a map, xid PLACEHOLDER

    @property
    def port(self) -> int:
        return self.proc.port

    def fingerprint(self) -> tuple[str, int, int]:
        """(SHA-256 of the model as ``GET /v1/model`` sends it, age, merges): any change to the model shows."""
        status = self.proc.status(timeout=TIMEOUT_S)
        return hashlib.sha256(self.proc.model(timeout=TIMEOUT_S)).hexdigest(), status["age"], status["merges"]

    def log_problems(self) -> list[str]:
        """What the node's log holds besides its own records below ERROR: ERROR and CRITICAL records, and
        every run of lines that are not the node's records at all (a traceback, a warning, a message of a
        library's logger that fell to Python's last-resort handler), one string per record or run."""
        out: list[str] = []
        run: list[str] = []
        for line in Path(self.proc.log_path).read_text().splitlines():
            if record := RECORD.match(line):
                if run:
                    out.append("\n".join(run))
                    run = []
                if record[1] in ("ERROR", "CRITICAL"):
                    out.append(line)
            else:
                run.append(line)
        if run:
            out.append("\n".join(run))
        return out


def node_args(node_id: str, cluster: str, key_file: str | None = None) -> list[str]:
    args = ["--id", node_id, "--cluster", cluster, "--no-train", "--discovery", "static", "--gossip-interval", "60"]
    return args + (["--secret-file", key_file] if key_file else [])


@contextlib.contextmanager
def targets(folder: Path, cluster: str | None = None) -> Iterator[dict[str, Target]]:
    """Start the open and the members-only node (in parallel), yield them by name, stop them."""
    cluster = cluster or f"fuzz-{secrets.token_hex(4)}"
    key_file = folder / "cluster.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    specs = (("open", OPEN_ID, None), ("member", MEMBER_ID, KEY))
    procs: list[NodeProcess] = []
    try:
        # each in its own cluster: a port in a fuzzed message makes a node probe that port; it must not join
        for name, node_id, key in specs:
            args = node_args(node_id, f"{cluster}-{name}", str(key_file) if key else None)
            procs.append(NodeProcess(args, str(folder / f"{name}.log"), port=free_port()))
        out = {}
        for proc, (name, node_id, key) in zip(procs, specs, strict=True):
            proc.wait_up()
            out[name] = Target(name, node_id, proc, key, template_of(proc.model()))
        yield out
    finally:
        for proc in procs:
            proc.close()


def template_of(model: bytes) -> dict[str, Any]:
    """A valid message for the node that sent ``model`` (its own state): from SENDER, without the port (a
    port makes the node probe the sender's address), with the placeholder xid."""
    msg = msgpack.unpackb(model, raw=False)
    msg.pop("port", None)
    msg["sender"], msg["xid"] = SENDER, PLACEHOLDER
    return Quiet(msg)


# -- building bodies ------------------------------------------------------------------------------
class Quiet(dict):
    """A template, shown short in hypothesis's reports (it holds a whole model)."""

    def __repr__(self) -> str:
        return f"<{len(self)} fields>"


class Blobs(list):
    """Valid encodings, shown short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} bodies>"


class Raw(bytes):
    """Bytes put into a message as they are (a deep nesting, a malformed value)."""


class Pairs(list):
    """A msgpack map as (key, value) pairs: keys may repeat."""


def _head(n: int, fix: int, b16: bytes, b32: bytes) -> bytes:
    """A msgpack map or array header for ``n`` entries: fix form under 16, else 16- or 32-bit."""
    return bytes([fix | n]) if n < 16 else b16 + struct.pack(">H", n) if n < 65536 else b32 + struct.pack(">I", n)


def pack(obj: Any) -> bytes:
    """msgpack of ``obj``, which may hold Raw bytes and Pairs (msgpack itself refuses neither, nor packs
    them)."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, dict | Pairs):
        items = list(obj.items()) if isinstance(obj, dict) else list(obj)
        return _head(len(items), 0x80, b"\xde", b"\xdf") + b"".join(pack(k) + pack(v) for k, v in items)
    if isinstance(obj, list | tuple):
        return _head(len(obj), 0x90, b"\xdc", b"\xdd") + b"".join(pack(v) for v in obj)
    return msgpack.packb(obj, use_bin_type=True)


FIELDS = ("v", "sender", "age", "params", "xid", "task", "merge", "samples", "weight", "cluster", "port")
TENSOR_FIELDS = ("dtype", "shape", "data")
BOUNDARY_INTS = [0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**53 + 1,
                 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**53) - 1, -(2**63)]  # fmt: skip
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 1.0, 1e15,
                  1.0000000000000002e15, 1e308, 1.7976931348623157e308, -1.0, 3.4028235e38, 3.5e38]  # fmt: skip
ODD_TEXTS = ["", " ", "\x00", "a\nb", "fuzzer\r\nX-Injected: 1", "\u202efuzzer", "fuzzer\x00", "ünïcödé", "🙂",
             "../../etc/passwd", "%s%s%n", "x" * 255, "x" * 256, "x" * 4096, "digits", "default", "average",
             "pushsum", "samples", "age", "0" * 32, PLACEHOLDER, PLACEHOLDER + "\n", PLACEHOLDER.upper()]  # fmt: skip
DTYPES = ["<f4", ">f4", "=f4", "f4", "float32", "<f8", "<f2", "<c8", "|u1", "|i1", "<i4", "<i8", "|b1", "|O", "O",
          "<U4", "|S4", "|V4", "<M8[s]", "", "<f4\x00", "<f3", "<f99999999999", "(2,)f4", "{}", "<f4 "]  # fmt: skip

ints = st.one_of(st.sampled_from(BOUNDARY_INTS), st.integers(-(2**63), 2**64 - 1))
floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats())
texts = st.one_of(st.sampled_from(ODD_TEXTS), st.text(max_size=40), st.text(min_size=250, max_size=300))


def _ext(code: int, data: bytes) -> Raw:
    """An ext value of any type code, the timestamp's (-1) included (msgpack.ExtType takes 0 to 127 only)."""
    return Raw(b"\xc7" + bytes([len(data)]) + struct.pack("b", code) + data)


exts = st.builds(_ext, st.integers(-128, 127), st.binary(max_size=16))
leaves = st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=64), exts)
map_keys = st.one_of(st.text(max_size=10), st.binary(max_size=8), st.integers(-5, 5), st.sampled_from(FIELDS))


def _deep(depth: int, kind: str) -> Raw:
    return Raw((b"\x91" if kind == "list" else b"\x81\xa1k") * depth + b"\xc0")


# depths around what the stack takes (1,000 frames) and msgpack (1,024 levels) are the interesting ones
depths = st.sampled_from([(1, 5000), (900, 1030), (970, 1024), (970, 1024)]).flatmap(lambda r: st.integers(*r))
deep = st.builds(_deep, depths, st.sampled_from(["list", "map"]))
values = st.recursive(
    leaves, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(map_keys, kids, max_size=5), max_leaves=16
)
any_value = st.one_of(values, deep)
xids = st.one_of(
    st.just(PLACEHOLDER),
    st.sampled_from(
        [
            PLACEHOLDER + "\n",
            PLACEHOLDER + "\r\n",
            PLACEHOLDER.upper(),
            PLACEHOLDER[:-1],
            PLACEHOLDER + "0",
            "\n" + PLACEHOLDER,
            PLACEHOLDER + " ",
            "",
            "\n",
        ]
    ),  # fmt: skip
    st.text("0123456789abcdefABCDEF\n -g", max_size=40),
    texts,
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "v": st.one_of(st.sampled_from([0, 1, 2, 3, -1, 2.0, "2", True, 2**64 - 1]), ints),
    "sender": st.one_of(st.just(SENDER), texts),
    "age": st.one_of(ints, floats, st.sampled_from([0, 2**53, 2**53 + 1, True])),
    "samples": st.one_of(ints, floats),
    "weight": st.one_of(floats, ints, st.sampled_from([0, 1e15, 1e16, True])),
    "port": st.one_of(ints, st.sampled_from([0, 1, 65535, 65536, -1])),
    "xid": xids,
    "task": texts,
    "merge": texts,
    "cluster": texts,
    "params": st.one_of(values, st.just({}), st.dictionaries(map_keys, values, max_size=3)),
}


def field_value(key: Any) -> st.SearchStrategy[Any]:
    specific = FIELD_VALUES.get(key)
    return any_value if specific is None else st.integers(0, 2).flatmap(lambda i: specific if i else any_value)


@st.composite
def mutated_tensor(draw: st.DrawFn, tensor: dict[str, Any]) -> Any:
    """One tensor entry ``{dtype, shape, data}`` with one thing wrong (or, rarely, right but extreme)."""
    if not isinstance(tensor, dict):  # mutated before into something else
        return draw(any_value)
    t = dict(tensor)
    data = t.get("data") if isinstance(t.get("data"), bytes) else b""
    shape = t.get("shape") if isinstance(t.get("shape"), list) and all(type(d) is int for d in t["shape"]) else [1]
    op = draw(
        st.sampled_from(["dtype", "shape", "data-length", "data-type", "poison", "drop-key", "add-key", "replace"])
    )
    if op == "dtype":
        t["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), texts, any_value))
    elif op == "shape":
        t["shape"] = choose(
            draw,
            st.lists(ints, max_size=4),
            [*shape, 1],
            shape[::-1],
            [math.prod(shape)],
            [float(d) for d in shape],
            [True] * len(shape),
            [-d for d in shape],
            [2**63 - 1] * len(shape),
            any_value,
            deep,
        )
    elif op == "data-length":
        n = draw(st.integers(0, len(data) + 8))
        t["data"] = (data + b"\x00" * 8)[:n] if n != len(data) else data + b"\x00"
    elif op == "data-type":
        t["data"] = choose(draw, list(data[:16]), data.hex(), any_value)
    elif op == "poison":  # a float32 at one place: NaN and Inf must be refused; extreme finite ones are valid
        where = draw(st.integers(0, max(0, len(data) // 4 - 1)))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3.4028235e38, -3.4028235e38, 1e-45, -0.0]))
        raw = struct.pack("<f", value) if t.get("dtype") == "<f4" else struct.pack("<d", value)
        t["data"] = data[: where * 4] + raw + data[where * 4 + len(raw) :]
    elif op == "drop-key":
        t.pop(draw(st.sampled_from(TENSOR_FIELDS)), None)
    elif op == "add-key":
        t[draw(map_keys)] = draw(any_value)
    else:
        return draw(any_value)
    return t


@st.composite
def mutated_message(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    """A valid message with one to four things changed: fields dropped, added, repeated or given odd
    values; tensors dropped, renamed, added or malformed; values nested deep."""
    msg: dict[Any, Any] = {k: v for k, v in template.items() if k != "params"}
    params: dict[Any, Any] = {name: dict(t) for name, t in template["params"].items()}
    extra: list[tuple[Any, Any]] = []  # repeated keys, after the others
    params_value: Any = params
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "set", "set", "xid", "deep", "repeat", "tensor", "tensor", "params"]))
        if op == "drop":
            key = draw(st.sampled_from([*sorted(msg, key=repr), "params"]))
            if key == "params":
                params_value = None
            else:
                msg.pop(key)
        elif op == "set":
            key = choose(draw, st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.sampled_from(FIELDS), map_keys)
            if key == "params":
                params_value = draw(field_value("params"))
            else:
                msg[key] = draw(field_value(key))
        elif op == "xid":  # the exchange id: of every shape, a newline after it among them
            msg["xid"] = draw(xids)
        elif op == "deep":  # a field or a tensor's dtype, shape or data nested hundreds deep
            key = choose(draw, st.sampled_from(FIELDS), st.sampled_from(TENSOR_FIELDS))
            if key in TENSOR_FIELDS and isinstance(params_value, dict) and params_value:
                name = draw(st.sampled_from(sorted(params_value, key=str)))
                if isinstance(params_value[name], dict):
                    params_value[name] = {**params_value[name], key: draw(deep)}
            elif key == "params":
                params_value = draw(deep)
            else:
                msg[key] = draw(deep)
        elif op == "repeat":
            key = draw(st.sampled_from(FIELDS))
            extra.append((key, draw(field_value(key))))
        elif op == "tensor" and isinstance(params_value, dict) and params_value:
            name = draw(st.sampled_from(sorted(params_value, key=str)))
            action = draw(st.sampled_from(["mutate", "mutate", "mutate", "drop", "rename", "add"]))
            if action == "mutate":
                params_value[name] = draw(mutated_tensor(params_value[name]))
            elif action == "drop":
                del params_value[name]
            elif action == "rename":
                params_value[draw(map_keys)] = params_value.pop(name)
            else:
                params_value[draw(map_keys)] = params_value[name]
        elif op == "params":
            params_value = draw(field_value("params"))
    items = list(msg.items())
    if params_value is not None:
        items.insert(min(3, len(items)), ("params", params_value))
    return pack(Pairs(items + extra))


def valid_encodings(template: dict[str, Any]) -> list[bytes]:
    """Valid messages: the template whole, and with the optional fields left out."""
    minimal = {k: template[k] for k in ("v", "sender", "age", "params", "xid")}
    return Blobs([pack(template), pack(minimal)])


def choose(draw: st.DrawFn, *options: Any) -> Any:
    """One of ``options``, drawn from if it is a strategy. (Options that depend on what was drawn before go
    through this, not ``one_of``: hypothesis merges equal branches, so the number of choices would vary.)"""
    option = options[draw(st.integers(0, len(options) - 1))]
    return draw(option) if isinstance(option, st.SearchStrategy) else option


def pick(blobs: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``blobs`` (``sampled_from`` would show them all whole in every report)."""
    return st.integers(0, len(blobs) - 1).map(lambda i: blobs[i])


@st.composite
def mutated_bytes(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A valid encoding with one to four byte-level changes: bits flipped, bytes set, the whole cut short,
    a slice deleted, inserted, duplicated, or the tail spliced from another message."""
    data = bytearray(draw(pick(bases)))
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "set", "truncate", "delete", "insert", "duplicate", "splice"]))
        # the structure is mostly at the head (fields, names, dtypes, shapes) and the tail (xid...)
        i = choose(draw, st.integers(0, min(n, 300)), st.integers(max(0, n - 200), n), st.integers(0, n))
        if op == "flip" and n:
            data[min(i, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[min(i, n - 1)] = draw(
                st.sampled_from([0x00, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xD9, 0xDE, 0xDF, 0x7F, 0x80])
            )
        elif op == "truncate":
            del data[i:]
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "duplicate":
            data[i:i] = data[i : i + draw(st.integers(1, 256))]
        elif op == "splice":
            other = draw(pick(bases))
            data[i:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def large_bytes(sizes: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """Random bytes of the drawn size, which may be far larger than hypothesis draws bytes for."""
    return st.builds(lambda n, rnd: rnd.randbytes(n), sizes, st.randoms(use_true_random=False))


def arbitrary_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), large_bytes(st.integers(512, 40_000)))


def msgpack_bodies() -> st.SearchStrategy[bytes]:
    """Arbitrary msgpack structures: any values, maps with any keys, deep nesting."""
    return st.one_of(values.map(pack), st.dictionaries(map_keys, any_value, max_size=12).map(pack), deep.map(pack))


def gossip_bodies(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Every kind of gossip body, for the signed ones."""
    return st.one_of(
        arbitrary_bytes(), msgpack_bodies(), mutated_message(template), mutated_bytes(valid_encodings(template))
    )


# -- requests -------------------------------------------------------------------------------------
SIGN_GOOD = "good"
BAD_SIGNATURES = ("unsigned", "garbage", "other-key", "stale", "future", "other-body", "other-path", "other-method",
                  "other-recipient", "no-recipient", "header-flip", "replay", "impersonate")  # fmt: skip
ONLY_401 = frozenset({401})
ANY_4XX = frozenset(range(400, 500))
VALID_ANSWERS = frozenset({200, 409, 413})
PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass
class Request:
    """A drawn request. ``sign`` says how to sign it when sent (None: not at all); ``expect``, the statuses
    that are right (None: any 4xx, or 200); ``raw``, a whole request to send as it is over a socket."""

    kind: str
    target: str
    path: str = "/v1/gossip"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    sign: str | None = None
    flip: tuple[int, int] = (0, 0)  # for "header-flip": where, and which printable character
    expect: frozenset[int] | None = None
    raw: bytes | None = None
    half_close: bool = False  # a raw request: shut the socket's write side after it (the body ends early)
    note: str = ""  # what the fuzzer's own check of the body found


@dataclass
class Outcome:
    status: int | None  # None: no answer
    error: str = ""
    body: bytes = b""


def problem(req: Request, out: Outcome) -> str | None:
    """Why ``out`` is wrong for ``req``, or None."""
    if out.status is None:
        # a client that ends its side mid-body is gone for aiohttp: the connection closes, cleanly, unanswered
        return None if req.half_close and out.error == CLOSED else f"no answer: {out.error}"
    if out.status >= 500:
        return f"{out.status}"
    if req.expect is not None:
        return None if out.status in req.expect else f"unexpected {out.status}, expected {sorted(req.expect)}"
    if not (out.status == 200 or 400 <= out.status < 500):
        return f"unexpected {out.status}"
    return None


def _no_repeated_keys(pairs: list[tuple[Any, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("repeated key")
    return out


def _depth(root: Any) -> int:
    """Levels of containers in ``root`` (0 for a scalar; msgpack allows 1,024, gossipfl's reader 32)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        v, level = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((x, level + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def invalid_because(body: bytes, template: dict[str, Any]) -> str | None:
    """Why a node whose own message is ``template`` must refuse the gossip message ``body``, or None when it
    must take it: the contract of ``protocol/wire.py`` written out again, apart from the code under test,
    so that a prepare of an invalid message (or a refusal of a valid one) shows."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:
        return "not msgpack"
    if not isinstance(msg, dict):
        return "not a map"
    if _depth(msg) > 32:
        return "nested deeper than 32 levels"
    try:  # msgpack-python keeps the last of a repeated key; gossipfl refuses the message
        msgpack.unpackb(body, raw=False, strict_map_key=True, object_pairs_hook=_no_repeated_keys)
    except ValueError:
        return "a map key repeated"

    def integer(v: Any, low: int, high: int) -> bool:
        return type(v) is int and low <= v <= high

    if not integer(msg.get("v"), 2, 2):
        return "protocol version"
    if not (isinstance(msg.get("sender"), str) and 1 <= len(msg["sender"]) <= 255):
        return "sender"
    if not integer(msg.get("age"), 0, 2**53):
        return "age"
    for key in ("task", "merge", "cluster"):
        if key in msg and not (isinstance(msg[key], str) and msg[key] == template[key]):
            return key
    if "samples" in msg and not integer(msg["samples"], 0, 2**53):
        return "samples"
    if "weight" in msg:
        w = msg["weight"]
        if type(w) not in (int, float) or not (math.isfinite(w) and 0 < w <= 1e15):
            return "weight"
    if "port" in msg and not integer(msg["port"], 1, 65535):
        return "port"
    if not (isinstance(msg.get("xid"), str) and VALID_XID.fullmatch(msg["xid"])):
        return "xid"
    params = msg.get("params")
    if not isinstance(params, dict) or set(params) != set(template["params"]):
        return "parameter names"
    for name, spec in template["params"].items():
        t = params[name]
        if not isinstance(t, dict) or not all(k in t for k in TENSOR_FIELDS):
            return f"{name}: not a tensor"
        if not (isinstance(t["dtype"], str) and t["dtype"] == spec["dtype"]):
            return f"{name}: dtype"
        if not (
            isinstance(t["shape"], list) and all(type(d) is int for d in t["shape"]) and t["shape"] == spec["shape"]
        ):
            return f"{name}: shape"
        if not (isinstance(t["data"], bytes) and len(t["data"]) == len(spec["data"])):
            return f"{name}: data length"
        if not np.isfinite(np.frombuffer(t["data"], dtype=spec["dtype"])).all():
            return f"{name}: NaN or Inf"
    return None


def answer_class(out: Outcome) -> str:
    """The status code as text, or how no answer came: "closed", "timeout" or "reset" (anything else)."""
    if out.status is not None:
        return str(out.status)
    if out.error == CLOSED:
        return CLOSED
    return "timeout" if "timed out" in out.error or "Timeout" in out.error else "reset"


def xid_of(reply: bytes) -> str | None:
    try:
        xid = msgpack.unpackb(reply, raw=False).get("xid")
    except Exception:
        return None
    return xid if isinstance(xid, str) else None


class Fuzzer:
    """Sends drawn requests to the targets, signing them as asked, aborting what gets prepared, and counts
    the outcomes per kind; ``failures`` keeps every wrong answer with its input."""

    def __init__(self, targets: dict[str, Target], timeout: float = TIMEOUT_S) -> None:
        self.targets = targets
        self.timeout = timeout
        self.counts: dict[str, Counter] = {}
        self.failures: list[dict[str, Any]] = []
        self.aborts = Counter()  # the aborts sent for prepared exchanges, by outcome

    # -- signing
    def _signature(self, req: Request, body: bytes, key: bytes | None) -> dict[str, str]:
        mode = req.sign
        if mode is None or mode == "unsigned" or key is None:
            return {}
        if mode == "garbage":
            return {HEADER: "v1 " + body[:40].hex()}
        path, method, to, sender = req.path, "POST", self.targets[req.target].node_id, SENDER
        signed_body = body if path == "/v1/gossip" else b""  # a decision is signed over no body: its body is not read
        clock = time.time
        if mode == "other-key":
            key = OTHER_KEY
        elif mode == "stale":
            clock = lambda: time.time() - 120  # noqa: E731
        elif mode == "future":
            clock = lambda: time.time() + 120  # noqa: E731
        elif mode == "other-body":
            signed_body = body + b"\x00"
        elif mode == "other-path":
            path = "/v1/gossip/" + "0" * 32 + "/commit"
        elif mode == "other-method":
            method = "GET"
        elif mode == "other-recipient":
            to = "someone-else"
        elif mode == "no-recipient":
            to = ""
        elif mode == "impersonate":
            sender = "another-member"
        header, _ = ClusterKey(key, clock=clock).sign_request(method, path, sender, to, signed_body)
        if mode == "header-flip":
            where, which = req.flip
            where %= len(header)
            char = PRINTABLE[which % len(PRINTABLE)]
            if char == header[where]:
                char = PRINTABLE[(which + 1) % len(PRINTABLE)]
            header = header[:where] + char + header[where + 1 :]
        return {HEADER: header}

    # -- sending
    def _http(self, port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> Outcome:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return Outcome(r.status, body=r.read())
        except (OSError, http.client.HTTPException) as e:
            return Outcome(None, f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def _raw(self, port: int, data: bytes, half_close: bool) -> Outcome:
        """Send ``data`` as it is; the answer (after any "100 Continue"), its body read by its Content-Length."""
        try:
            with socket.create_connection((LOOPBACK, port), timeout=self.timeout) as s:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
                reply = b""
                while True:
                    if b"\r\n\r\n" in reply:
                        head, rest = reply.split(b"\r\n\r\n", 1)
                        if not head.startswith(b"HTTP/1.1 100 "):
                            break
                        reply = rest  # "continue": the answer follows
                        continue
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                if not reply:
                    # the body ended early: the server took that as the client gone
                    return Outcome(None, CLOSED if half_close else "closed without an answer")
                if not reply.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) or b"\r\n\r\n" not in reply:
                    return Outcome(None, f"no HTTP answer ({reply[:40]!r})")
                head, body = reply.split(b"\r\n\r\n", 1)
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(body) < int(length[1]) and (chunk := s.recv(65536)):
                    body += chunk
        except OSError as e:
            return Outcome(None, f"{type(e).__name__}: {e}")
        return Outcome(int(head.split(b" ", 2)[1]), body=body)

    def send(self, req: Request) -> Outcome:
        """Send ``req`` (and, when a gossip message was prepared, abort it); record and return the outcome."""
        target = self.targets[req.target]
        if req.raw is not None:
            out = self._raw(target.port, req.raw, req.half_close)
            self._after(target, req, out)
            self._record(req, out, req.raw)
            return out
        body = req.body.replace(PLACEHOLDER.encode(), secrets.token_hex(16).encode())
        if req.path == "/v1/gossip" and req.expect is None and req.sign in (None, SIGN_GOOD):  # reaches the decoder
            req = self._oracle(req, body, target)
        headers = {"Content-Type": "application/msgpack", **req.headers, **self._signature(req, body, target.key)}
        if req.sign == "replay":  # the same signed request twice: the second must be refused
            good = dataclasses.replace(req, sign=SIGN_GOOD)
            headers = {"Content-Type": "application/msgpack", **req.headers, **self._signature(good, body, target.key)}
            first = self._http(target.port, "POST", req.path, body, headers)
            self._after(target, req, first)
        out = self._http(target.port, "POST", req.path, body, headers)
        self._after(target, req, out)
        self._record(req, out, body)
        return out

    def _oracle(self, req: Request, body: bytes, target: Target) -> Request:
        """``req`` with the answers right for ``body``: a 4xx for an invalid message; for a valid one, a 200, a
        409 (its xid used before, or no room) or a 413, or a 401 from a member sending as someone else."""
        why = invalid_because(body, target.template)
        if why is not None:
            return dataclasses.replace(req, expect=ANY_4XX, note=f"invalid: {why}")
        if target.key is not None and msgpack.unpackb(body, raw=False)["sender"] != SENDER:
            return dataclasses.replace(req, expect=ONLY_401, note="valid, from another sender than the signer")
        return dataclasses.replace(req, expect=VALID_ANSWERS, note="valid")

    def _after(self, target: Target, req: Request, out: Outcome) -> None:
        """A prepared exchange is aborted at once: the model must not change, and the node must have room."""
        if req.path != "/v1/gossip" or out.status not in (200, None):
            return
        if out.status is None:  # the body may have been whole, and prepared, before the client hung up
            if (xid := xid_of(req.body)) is not None and VALID_XID.fullmatch(xid):
                self._abort(target, xid)
            return
        xid = xid_of(out.body)
        if xid is None or not VALID_XID.fullmatch(xid):
            self.aborts["not aborted: no valid xid in the reply"] += 1
            if problem(req, out) is None:  # (else it is a failure already)
                self._fail(req, "prepared an exchange with an invalid xid", out, req.body)
            return
        r = self._abort(target, xid)
        if r.status == 200 and json.loads(r.body).get("outcome") == "aborted":
            self.aborts["aborted"] += 1
        else:
            self.aborts[f"abort answered {answer_class(r)}"] += 1
            self._fail(req, f"the abort of the prepared exchange answered {answer_class(r)}", r, req.body)

    def _abort(self, target: Target, xid: str) -> Outcome:
        path = f"/v1/gossip/{xid}/abort"
        headers = {}
        if target.key is not None:
            headers[HEADER] = ClusterKey(target.key).sign_request("POST", path, SENDER, target.node_id)[0]
        return self._http(target.port, "POST", path, b"", headers)

    def _record(self, req: Request, out: Outcome, body: bytes) -> None:
        c = self.counts.setdefault(req.kind, Counter())
        c["requests"] += 1
        c[answer_class(out)] += 1
        if (why := problem(req, out)) is not None:
            self._fail(req, why, out, body)

    def _fail(self, req: Request, why: str, out: Outcome, body: bytes) -> None:
        self.counts.setdefault(req.kind, Counter())["failures"] += 1
        self.failures.append(
            {
                "kind": req.kind,
                "target": req.target,
                "path": req.path,
                "sign": req.sign,
                "headers": req.headers,
                "problem": why,
                "note": req.note,
                "answer": out.body[:300].decode("utf-8", "replace"),
                "body_hex": body[:512].hex(),
                "body_len": len(body),
            }
        )


# -- the kinds of request -------------------------------------------------------------------------
def gossip_open(template: dict[str, Any], kind: str) -> st.SearchStrategy[Request]:
    """Junk to the open node's ``/v1/gossip``, by kind: bytes, msgpack, fields, mutated bytes."""
    bodies = {
        "bytes": arbitrary_bytes(),
        "msgpack": msgpack_bodies(),
        "fields": mutated_message(template),
        "bitflips": mutated_bytes(valid_encodings(template)),
    }[kind]
    return bodies.map(lambda b: Request(f"gossip-{kind}", "open", body=b))


def gossip_signed(template: dict[str, Any]) -> st.SearchStrategy[Request]:
    """Junk from an authenticated member: correctly signed, so that it reaches the decoder."""
    return gossip_bodies(template).map(lambda b: Request("signed-junk", "member", body=b, sign=SIGN_GOOD))


@st.composite
def gossip_badly_signed(draw: st.DrawFn, template: dict[str, Any]) -> Request:
    """Valid and junk bodies, unsigned or signed wrong in every way: always 401. (A member signing as another
    than the body's sender is caught once the body is decoded: it gets valid bodies only, or junk would get
    its 400 first.)"""
    mode = draw(st.sampled_from(BAD_SIGNATURES))
    valid = pick(valid_encodings(template))
    body = draw(valid if mode == "impersonate" else st.one_of(valid, gossip_bodies(template)))
    flip = (draw(st.integers(0, 300)), draw(st.integers(0, len(PRINTABLE) - 1)))
    return Request("bad-signature", "member", body=body, sign=mode, flip=flip, expect=ONLY_401)


@st.composite
def decisions(draw: st.DrawFn) -> Request:
    """``/v1/gossip/{xid}/{commit|abort}`` with ids of every shape and bodies of any bytes: a well-formed id
    never prepared is aborted (200), any other is a 400 (or a 404: not this route); the body is not read.
    On the members-only node a decision is signed over no body (whatever body it brings), or refused."""
    xid = draw(st.binary(min_size=16, max_size=16)).hex() if draw(st.booleans()) else draw(xids)
    path = f"/v1/gossip/{urllib.parse.quote(xid, safe='')}/{draw(st.sampled_from(['commit', 'abort']))}"
    body = draw(st.one_of(st.just(b""), arbitrary_bytes()))
    expect = frozenset({200}) if VALID_XID.fullmatch(xid) else frozenset({400, 404})
    if draw(st.booleans()):
        return Request("decision", "open", path, body, expect=expect)
    sign = draw(st.sampled_from([SIGN_GOOD, SIGN_GOOD, "unsigned", "other-key", "replay"]))
    return Request("decision", "member", path, body, sign=sign, expect=expect if sign == SIGN_GOOD else ONLY_401)


# inference: the digits model (input "input" FP32 [-1, 64]; outputs "probabilities", "label")
INFER = "/v2/models/digits/infer"
OIP_HEADER = "Inference-Header-Content-Length"


def json_values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**30), 10**30), floats, texts, st.sampled_from(BOUNDARY_INTS)
    )
    return st.recursive(
        leaf, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(texts, kids, max_size=4), max_leaves=12
    )


ODD_SHAPES = [[0, 64], [-1, 64], [4096, 64], [4097, 64], [True, 64], [], [64]]
output_names = st.one_of(texts, st.sampled_from(["label", "probabilities"]))


@st.composite
def infer_doc(draw: st.DrawFn) -> dict[str, Any]:
    """A valid JSON infer request, then zero to three things changed in it."""
    batch = draw(st.integers(1, 3))
    data = draw(st.lists(st.floats(-10, 10, width=32), min_size=batch * 64, max_size=batch * 64))
    item: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [batch, 64], "data": data}
    doc: dict[str, Any] = {"id": "fuzz", "inputs": [item]}
    if draw(st.booleans()):
        doc["outputs"] = [
            {"name": "probabilities"},
            {"name": "label", "parameters": {"binary_data": draw(st.booleans())}},
        ]
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["doc", "item", "item", "shape", "data", "data", "outputs"]))
        if where == "doc":
            doc[draw(st.sampled_from(["id", "inputs", "outputs", "parameters", "extra"]))] = draw(json_values())
        elif where == "item":
            key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
            if draw(st.booleans()):
                item.pop(key, None)
            else:
                item[key] = draw(
                    st.one_of(
                        json_values(),
                        st.sampled_from(["FP64", "FP16", "INT64", "BOOL", "BYTES", "BF16", "fp32", "input", "label"]),
                    )
                )
        elif where == "shape":
            item["shape"] = draw(
                st.one_of(
                    st.lists(st.sampled_from(BOUNDARY_INTS), max_size=3),
                    st.sampled_from(ODD_SHAPES + [[batch * 64], [batch, 64, 1], [batch, 8, 8]]),
                )
            )
        elif where == "data":
            item["data"] = choose(
                draw,
                st.lists(st.one_of(floats, st.integers(-(10**40), 10**40), texts, st.booleans()), max_size=200),
                [data[i : i + 64] for i in range(0, len(data), 64)],  # nested as the shape: valid
                [data[:3], data[3:]],  # ragged
                data + [1.0],
                [[v] for v in data],
                json_values(),
            )
        else:
            doc["outputs"] = draw(
                st.one_of(
                    st.lists(st.fixed_dictionaries({"name": output_names}, optional={"parameters": json_values()})),
                    json_values(),
                )
            )
    return doc


@st.composite
def infer_json(draw: st.DrawFn) -> Request:
    """JSON infer requests: mutated documents, texts cut and corrupted, deep nesting, non-UTF-8, huge numbers."""
    text = json.dumps(draw(infer_doc())).encode()  # NaN and Infinity pass through as JSON refuses them
    how = draw(st.sampled_from(["as-is", "as-is", "bytes", "deep", "deep", "non-utf8", "huge-number", "any"]))
    if how == "bytes":
        text = draw(mutated_bytes(Blobs([text])))
    elif how == "deep":  # the whole document, its inputs, or a tensor's data
        d = choose(draw, st.integers(1, 200_000), st.integers(2, 1100), st.integers(400, 1000))
        nested = b"[" * d + b"1" + b"]" * d
        where = draw(st.sampled_from(["document", "inputs", "data", "data"]))
        if where == "document":
            text = nested
        elif where == "inputs":
            text = b'{"inputs": ' + nested + b"}"
        else:
            text = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ' + nested + b"}]}"
    elif how == "non-utf8":
        i = draw(st.integers(0, len(text)))
        text = (
            text[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"])) + text[i:]
        )
    elif how == "huge-number":
        text = text.replace(b'"shape": [', b'"shape": [' + b"9" * draw(st.integers(1, 10_000)) + b", ", 1)
    elif how == "any":
        text = draw(arbitrary_bytes())
    path = INFER
    if draw(st.integers(0, 4)) == 4:  # another model or version (a 404)
        path = draw(st.sampled_from(["/v2/models/digits/versions/1/infer", "/v2/models/digits/versions/2/infer",
                                     "/v2/models/nope/infer", "/v2/models/%00%ff/infer",
                                     "/v2/models/" + "d" * 300 + "/infer"]))  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if draw(st.integers(0, 9)) == 9:  # (not on the simplest draw, 0: that one is valid)
        headers[OIP_HEADER] = draw(st.sampled_from(["0", "-1", "x", str(len(text)), str(len(text) + 1), "9" * 40]))
    return Request("infer-json", "open", path, text, headers)


@st.composite
def infer_binary(draw: st.DrawFn) -> Request:
    """Binary-extension infer requests: header lengths, binary_data_size and byte counts that disagree,
    wrong datatypes, huge declared sizes."""
    batch = draw(st.integers(1, 3))
    raw = choose(
        draw,
        np.zeros(batch * 64, "<f4").tobytes(),
        st.binary(min_size=batch * 256, max_size=batch * 256),  # any bits: NaN and Inf among them
        large_bytes(st.integers(0, 4096)),
    )
    size: Any = batch * 256
    size = choose(
        draw,
        size,
        size,
        st.sampled_from([0, -1, size - 1, size + 1, 2**62, 2**64, 1.5, True, "256", None]),
        json_values(),
    )
    item: dict[str, Any] = {
        "name": "input",
        "datatype": "FP32",
        "shape": [batch, 64],
        "parameters": {"binary_data_size": size},
    }
    if draw(st.integers(0, 4)) == 4:
        item[draw(st.sampled_from(["datatype", "shape", "data", "name", "parameters"]))] = draw(
            st.one_of(json_values(), st.sampled_from(["INT8", "FP64", "BYTES", [batch * 2, 32], [batch, 64, 1]]))
        )
    doc: dict[str, Any] = {"inputs": [item] * draw(st.sampled_from([1, 1, 1, 2]))}
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.one_of(st.booleans(), json_values()))}
    header = json.dumps(doc).encode()
    n = len(header)
    odd = [n - 1, n + 1, "0", "-5", "", " 7", "+3", "1_0", "0x10", "9" * 30, n + len(raw), n + len(raw) + 1, "nan"]
    length = str(choose(draw, n, n, st.sampled_from(odd)))
    return Request(
        "infer-binary", "open", INFER, header + raw, {"Content-Type": "application/octet-stream", OIP_HEADER: length}
    )


@st.composite
def framing(draw: st.DrawFn, template: dict[str, Any]) -> Request:
    """Whole requests over a raw socket whose framing lies: a Content-Length longer (then the body ends) or
    shorter than the body, malformed or repeated, with chunked encoding, broken chunks, unknown transfer
    or content encodings, junk compressed bodies."""
    path = draw(st.sampled_from(["/v1/gossip", "/v1/gossip", INFER, f"/v1/gossip/{secrets.token_hex(16)}/abort"]))
    body = draw(st.one_of(pick(valid_encodings(template)), st.binary(max_size=2048)))
    body = body.replace(PLACEHOLDER.encode(), secrets.token_hex(16).encode())
    how = draw(
        st.sampled_from(
            [
                "short",  # (first: the simplest draws go to requests that get an answer)
                "long",
                "bad-length",
                "two-lengths",
                "length-and-chunked",
                "chunked",
                "bad-chunks",
                "transfer-encoding",
                "content-encoding",
                "expect",
            ]
        )
    )
    head = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}", "Content-Type: application/octet-stream"]
    half_close = False
    sent = body  # the body as sent (encoded, compressed)
    if how == "long":  # announce more than comes, then end the stream
        head.append(f"Content-Length: {len(body) + draw(st.integers(1, 10_000))}")
        half_close = True
    elif how == "short":
        head.append(f"Content-Length: {draw(st.integers(0, max(0, len(body) - 1)))}")
    elif how == "bad-length":
        value = draw(st.sampled_from(["-1", "abc", "1e3", "0x10", "+5", " 5", "5 5", "99999999999999999999999",
                                      "18446744073709551616", "", "١٢"]))  # fmt: skip
        head.append(f"Content-Length: {value}")
    elif how == "two-lengths":
        head += [f"Content-Length: {len(body)}", f"Content-Length: {draw(st.integers(0, len(body) + 5))}"]
    elif how == "length-and-chunked":
        head += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
    elif how in ("chunked", "bad-chunks"):
        head.append("Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        chunks = [body[:cut], body[cut:]]
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
        if how == "bad-chunks":
            encoded = draw(mutated_bytes(Blobs([encoded])))
            half_close = True  # a chunk that never ends would otherwise wait for the body deadline
        sent = encoded
    elif how == "transfer-encoding":
        head.append(
            "Transfer-Encoding: "
            + draw(st.sampled_from(["gzip", "identity", "chunked, chunked", "gzip, chunked", "x"]))
        )
        head.append(f"Content-Length: {len(body)}")
    elif how == "content-encoding":
        coding = draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "x-unknown", "gzip, deflate"]))
        if draw(st.booleans()) and coding in ("gzip", "deflate"):
            z = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
            sent = z.compress(body) + z.flush()
        head += [f"Content-Encoding: {coding}", f"Content-Length: {len(sent)}"]
    else:
        head += ["Expect: 100-continue", f"Content-Length: {len(body)}"]
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + sent
    return Request("framing", "open", path, body, raw=raw, half_close=half_close)


# -- the shares of a run ----------------------------------------------------------------------------
def kinds(t: dict[str, Target]) -> dict[str, tuple[float, st.SearchStrategy[Request]]]:
    """Every kind of request: (share of the requests, strategy)."""
    open_t, member_t = t["open"].template, t["member"].template
    return {
        "gossip-bytes": (0.10, gossip_open(open_t, "bytes")),
        "gossip-msgpack": (0.10, gossip_open(open_t, "msgpack")),
        "gossip-fields": (0.18, gossip_open(open_t, "fields")),
        "gossip-bitflips": (0.12, gossip_open(open_t, "bitflips")),
        "signed-junk": (0.16, gossip_signed(member_t)),
        "bad-signature": (0.08, gossip_badly_signed(member_t)),
        "decision": (0.06, decisions()),
        "infer-json": (0.10, infer_json()),
        "infer-binary": (0.06, infer_binary()),
        "framing": (0.04, framing(open_t)),
    }


def run_kind(
    fuzzer: Fuzzer, strategy: st.SearchStrategy[Request], n: int, *, derandomize: bool = False, seed: int | None = None
) -> int:
    """Send ``n`` requests drawn from ``strategy`` (fewer if hypothesis runs out of distinct ones); the
    number sent. Failures are recorded, not raised: a run goes on past them."""
    sent = 0

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(strategy)
    def one(req: Request) -> None:
        nonlocal sent
        if sent < n:
            fuzzer.send(req)
            sent += 1

    if seed is not None:
        one = hypothesis.seed(seed)(one)
    one()
    return sent


# -- the CI part: a few hundred requests ----------------------------------------------------------
CI_EXAMPLES = {
    "gossip-bytes": 30,
    "gossip-msgpack": 30,
    "gossip-fields": 60,
    "gossip-bitflips": 40,
    "signed-junk": 50,
    "bad-signature": 40,
    "decision": 25,
    "infer-json": 40,
    "infer-binary": 25,
    "framing": 25,
}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Target]]:
    with targets(tmp_path_factory.mktemp("fuzz")) as t:
        yield t


@pytest.fixture(scope="module")
def before(nodes: dict[str, Target]) -> dict[str, tuple[str, int, int]]:
    return {name: t.fingerprint() for name, t in nodes.items()}


def check(fuzzer: Fuzzer, nodes: dict[str, Target], before: dict[str, tuple[str, int, int]]) -> None:
    """No wrong answer, both models as they were, no error in either log."""
    assert fuzzer.failures == [], json.dumps(fuzzer.failures[:5], indent=1)
    assert {name: t.fingerprint() for name, t in nodes.items()} == before
    assert {name: t.log_problems() for name, t in nodes.items()} == {name: [] for name in nodes}


@pytest.mark.parametrize("kind", sorted(CI_EXAMPLES))
def test_fuzzed_requests_get_a_4xx_or_a_200_and_change_no_model(kind, nodes, before):
    """Each kind, derandomized (the same requests every run but for fresh xids, nonces and timestamps)."""
    fuzzer = Fuzzer(nodes)
    sent = run_kind(fuzzer, kinds(nodes)[kind][1], CI_EXAMPLES[kind], derandomize=True)
    assert sent >= CI_EXAMPLES[kind] * 0.8, sent
    check(fuzzer, nodes, before)
    counts = fuzzer.counts[kind]
    if kind == "bad-signature":
        assert counts["401"] == counts["requests"]
    if kind in ("gossip-fields", "signed-junk"):  # the mutations reach the decoder: most are refused there
        assert counts["400"] > counts["requests"] / 3, counts
    assert set(fuzzer.aborts) <= {"aborted"}, fuzzer.aborts


def test_the_fuzzed_nodes_still_answer(nodes, before):
    """After the kinds above (in file order; with random order, after those that ran before), the nodes
    still prepare a valid message and serve inference, and their loops ran without error."""
    fuzzer = Fuzzer(nodes)
    for name, t in nodes.items():
        req = Request("valid", name, body=pack(t.template), sign=SIGN_GOOD, expect=frozenset({200}))
        assert fuzzer.send(req).status == 200
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    assert fuzzer.send(Request("valid", "open", INFER, json.dumps(doc).encode(), expect=frozenset({200}))).status == 200
    check(fuzzer, nodes, before)
    assert fuzzer.aborts == Counter({"aborted": 2})
    for t in nodes.values():
        status = t.proc.status()
        assert status["failure"] is None
        assert all(loop["errors"] == 0 for loop in status["loops"].values()), status["loops"]


@pytest.mark.parametrize("target", ["open", "member"])
def test_a_body_whose_content_encoding_does_not_decode_is_refused_without_a_traceback(nodes, before, target):
    """Found fuzzing: a body in a Content-Encoding that does not decode (br, deflate, gzip) got its
    4xx, but aiohttp, draining the body after the answer, met the decoding error again and logged it as an
    unhandled exception, with a traceback, once per request: anyone could fill the log."""
    t = nodes[target]
    fuzzer = Fuzzer(nodes)
    seen = len(t.log_problems())
    body = b"\x8b\x1f not compressed at all " * 8
    for path in ("/v1/gossip", INFER, f"/v1/gossip/{secrets.token_hex(16)}/abort"):
        for coding in ("br", "deflate", "gzip"):
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: {coding}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            out = fuzzer.send(Request("encoding", target, path, raw=head.encode() + body))
            assert out.status is not None and 200 <= out.status < 500, (path, coding, out)
    time.sleep(0.5)  # (the drain, and its log record, come after the answer)
    assert t.log_problems()[seen:] == []
    check(fuzzer, nodes, before)


def test_an_xid_with_a_newline_after_it_is_refused(nodes, before):
    """Found while fuzzing: ``^[0-9a-f]{32}$`` lets a newline follow the 32 digits (``$`` matches before a
    final newline), so an exchange id of 33 characters was prepared, and could be decided."""
    fuzzer = Fuzzer(nodes)
    for suffix in ("\n", "\r", " ", "0"):
        msg = dict(nodes["open"].template, xid=secrets.token_hex(16) + suffix)
        out = fuzzer.send(Request("xid", "open", body=pack(msg), expect=frozenset({400})))
        assert out.status == 400 and b"xid" in out.body, (suffix, out)
    out = fuzzer.send(Request("xid", "open", f"/v1/gossip/{secrets.token_hex(16)}%0A/commit", expect=frozenset({400})))
    assert out.status == 400, out
    check(fuzzer, nodes, before)


@pytest.mark.parametrize("path", ["/v1/gossip", INFER])
def test_a_body_that_stops_coming_gets_a_408_on_every_route(nodes, before, path):
    """Found fuzzing (a Content-Length of " 5" over 2 bytes): a gossip body not whole by its deadline got a
    408, an inference body a 400, though the docs (liveness.md) and the OpenAPI document say 408 for both."""
    fuzzer = Fuzzer(nodes)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    out = fuzzer.send(Request("stall", "open", path, raw=head.encode() + b"{}", expect=frozenset({408})))
    assert out.status == 408 and b"not received within" in out.body, out
    check(fuzzer, nodes, before)


@pytest.mark.parametrize("depth", [500, 800, 960])
def test_inference_data_nested_hundreds_deep_is_a_400(nodes, before, depth):
    """Found while fuzzing: JSON parses lists nested up to about 990 deep, but checking how ``data`` nests
    recursed once per level (twice the frames), so a list nested 500 to 980 deep ran out of stack: a 500."""
    nested = "[" * depth + "1" + "]" * depth
    body = f'{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": {nested}}}]}}'
    fuzzer = Fuzzer(nodes)
    out = fuzzer.send(Request("deep", "open", INFER, body.encode(), {"Content-Type": "application/json"}))
    assert out.status == 400 and b"nests deeper" in out.body, out
    check(fuzzer, nodes, before)


@pytest.mark.parametrize("depth", [980, 1000, 1020])
@pytest.mark.parametrize("target", ["open", "member"])
def test_a_tensor_shape_nested_a_thousand_deep_is_a_400(nodes, before, depth, target):
    """Found while fuzzing: msgpack decodes lists nested up to 1,024 deep, and a shape that was not a list of
    integers was put in the error message whole; from about 980 levels its repr ran out of stack: a 500 (on
    the members-only node, for a member's signed message). The message reader (common/msgview.py) now
    refuses nesting beyond 32 levels before anything looks at the shape."""
    t = nodes[target]
    params = {name: dict(tensor) for name, tensor in t.template["params"].items()}
    params[next(iter(params))]["shape"] = Raw(b"\x91" * depth + b"\xc0")
    fuzzer = Fuzzer(nodes)
    out = fuzzer.send(Request("deep", target, body=pack(dict(t.template, params=params)), sign=SIGN_GOOD))
    assert out.status == 400 and b"malformed msgpack: nested deeper than 32" in out.body, out
    check(fuzzer, nodes, before)


def test_the_checks_catch_what_they_must(nodes, before):
    """The fuzzer's own checks: a 5xx, no answer, a wrong status and a changed model are each caught."""
    assert problem(Request("k", "open"), Outcome(500)) == "500"
    assert problem(Request("k", "open"), Outcome(None, "timeout")) == "no answer: timeout"
    assert problem(Request("k", "member", expect=frozenset({401})), Outcome(200)) is not None
    assert problem(Request("k", "open"), Outcome(204)) is not None
    assert problem(Request("k", "open"), Outcome(413)) is None
    fuzzer = Fuzzer(nodes)
    changed = dict(before, open=("0" * 64, *before["open"][1:]))
    with pytest.raises(AssertionError):
        check(fuzzer, nodes, changed)


def test_pack_writes_what_msgpack_reads():
    obj = {"a": [1, 2.5, None, b"x", "y" * 20], "b": {"c": list(range(20))}, 3: True}
    assert msgpack.unpackb(pack(obj), raw=False, strict_map_key=False) == obj
    assert msgpack.unpackb(pack(Pairs([("k", 1), ("k", 2)])), raw=False) == {"k": 2}
    assert pack(Raw(b"\xc0")) == b"\xc0"


def test_the_contract_check_knows_valid_from_invalid():
    tensor = {"dtype": "<f4", "shape": [2], "data": np.array([1.0, 2.0], "<f4").tobytes()}
    template = Quiet(v=2, sender=SENDER, age=1, params={"w": tensor}, task="t", merge="average", cluster="c")
    valid = {**template, "xid": secrets.token_hex(16)}
    assert invalid_because(pack(valid), template) is None
    assert invalid_because(pack({**valid, "weight": 3, "samples": 0, "port": 65535, "extra": [1]}), template) is None
    nan = {"w": {**tensor, "data": np.array([1.0, np.nan], "<f4").tobytes()}}
    for change, why in [
        ({"v": True}, "protocol version"),
        ({"age": 2**53 + 1}, "age"),
        ({"sender": ""}, "sender"),
        ({"task": "other"}, "task"),
        ({"weight": True}, "weight"),
        ({"weight": 1e16}, "weight"),
        ({"port": 0}, "port"),
        ({"xid": valid["xid"] + "\n"}, "xid"),
        ({"params": {}}, "parameter names"),
        ({"params": {"w": {**tensor, "shape": [True, 2]}}}, "w: shape"),
        ({"params": {"w": {**tensor, "dtype": ">f4"}}}, "w: dtype"),
        ({"params": {"w": {**tensor, "data": b"x"}}}, "w: data length"),
        ({"params": nan}, "w: NaN or Inf"),
    ]:
        assert invalid_because(pack({**valid, **change}), template) == why, change
    assert invalid_because(b"\xc1", template) == "not msgpack"
    assert invalid_because(pack({**valid, "extra": [[[[0]]]]}), template) is None
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    assert invalid_because(pack({**valid, "extra": deep}), template) == "nested deeper than 32 levels"
    repeated = pack({**valid, "zzz": 1}).replace(b"\xa3zzz", b"\xa3age", 1)  # "age" twice, the last valid
    assert msgpack.unpackb(repeated)["age"] == 1 and invalid_because(repeated, template) == "a map key repeated"
    assert invalid_because(pack([1]), template) == "not a map"

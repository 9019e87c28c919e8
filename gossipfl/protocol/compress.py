"""Compression of the tensors an exchange sends (``--compress``): small codecs behind one interface and a
registry, in the style of hivemind's ``compression`` module. Pure functions of arrays; the wire codec
(wire.py) declares the codec in each message and puts the fields of each tensor on the wire.

| codec | a tensor on the wire | bytes / float32 |
| --- | --- | --- |
| ``none`` | ``data``: the values | 1 |
| ``fp16`` | ``data``: IEEE half precision (clipped to +-65504) | 1/2 |
| ``bf16`` | ``data``: bfloat16 (the upper 16 bits of float32, rounded to nearest even) | 1/2 |
| ``int8`` | ``data``: int8 in [-127, 127]; ``scale``: float32, one per block of 256 values (max abs / 127) | ~0.27 |
| ``topk:F`` | ``idx``: uint32, increasing; ``data``: the values there (F <= 1/2 of each tensor) | ~2F (+F back) |

A dense codec's message decodes, on both sides, to the same values (``decode(encode(x))``, bit for bit), so
both partners merge the same two models; each keeps what its own codec lost (see core.py). Top-k is not a
dense codec: the sender picks coordinates (``TopK.select``), both partners average just those, and the
responder answers with its values at the same coordinates (its reply carries no ``idx``)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np

INT8_BLOCK = 256
FP16_MAX = float(np.finfo(np.float16).max)
BF16_MAX = 3.3895313892515355e38  # largest finite bfloat16
F32_MAX = float(np.finfo(np.float32).max)
INDEX_DTYPE = np.dtype("<u4")
MAX_TENSOR_VALUES = 2**32 - 1  # what a uint32 index can address
RANDOM_SHARE = 0.25  # of a top-k selection, drawn at random instead (see TopK.select)
MAX_TOPK_FRACTION = 0.5  # beyond half, an index and a value per coordinate cost more than the dense tensor


class Codec(ABC):
    """Turns a flat tensor into named wire fields and back."""

    name: ClassVar[str]  # as declared in a message's "compress" field
    lossless: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The ``--compress`` value that gives this codec."""
        return self.name

    @abstractmethod
    def ratio(self) -> float:
        """Expected bytes on the wire per byte of float32 sent uncompressed (one direction)."""

    @abstractmethod
    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The wire fields of a flat, finite floating-point tensor."""

    @abstractmethod
    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        """The flat tensor of ``n`` values of ``dtype`` that ``fields`` (as ``encode`` made them) stand for:
        a new, writable array. ValueError naming the problem when a field is missing, of the wrong length or
        out of range."""


def _field(fields: Mapping[str, object], key: str, dtype: np.dtype, count: int) -> np.ndarray:
    raw = fields.get(key)
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ValueError(f"field {key!r} must be bytes")
    nbytes = memoryview(raw).nbytes
    if nbytes != count * dtype.itemsize:
        raise ValueError(f"{nbytes} {key} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


class NoCompression(Codec):
    name = "none"
    lossless = True

    def ratio(self) -> float:
        return 1.0

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"data": x}

    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        a = _field(fields, "data", dtype.newbyteorder("<"), n)
        return a if a.flags.writeable else a.copy()


class Float16(Codec):
    name = "fp16"

    def ratio(self) -> float:
        return 0.5

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"data": np.clip(x, -FP16_MAX, FP16_MAX).astype("<f2")}

    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        return _field(fields, "data", np.dtype("<f2"), n).astype(dtype)  # every finite f2 fits any float


class BFloat16(Codec):
    name = "bf16"

    def ratio(self) -> float:
        return 0.5

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        bits = np.clip(x, -BF16_MAX, BF16_MAX).astype("<f4").view("<u4")
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))  # to nearest, ties even
        return {"data": (rounded >> np.uint32(16)).astype("<u2")}

    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        half = _field(fields, "data", np.dtype("<u2"), n)
        if ((half & 0x7F80) == 0x7F80).any():
            raise ValueError("field 'data': a bfloat16 that is Inf or NaN")
        return (half.astype("<u4") << np.uint32(16)).view("<f4").astype(dtype)


class Int8(Codec):
    """Symmetric 8-bit quantization with a float32 scale per block of INT8_BLOCK values (round to nearest)."""

    name = "int8"

    def ratio(self) -> float:
        return 0.25 + 1 / INT8_BLOCK

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # (a wider float beyond float32's range: clipped with room for the rounding of scale x 127)
        x32 = np.clip(x, -F32_MAX / 2, F32_MAX / 2).astype(np.float32) if x.dtype.itemsize > 4 else x
        q, scale = np.empty(x.size, "i1"), np.empty(-(-x.size // INT8_BLOCK), "<f4")
        blocks, tail = _blocks(x32)
        scale[: len(blocks)] = np.abs(blocks).max(axis=1, initial=0)
        if tail.size:
            scale[-1] = np.abs(tail).max()
        scale /= np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        q_blocks, q_tail = _blocks(q)
        with np.errstate(over="ignore"):  # (a subnormal scale: x / scale can exceed 127, clipped)
            q_blocks[:] = np.clip(np.rint(blocks / safe[: len(blocks), None]), -127, 127)
            q_tail[:] = np.clip(np.rint(tail / safe[-1]), -127, 127)
        return {"data": q, "scale": scale}

    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        q = _field(fields, "data", np.dtype("i1"), n)
        scale = _field(fields, "scale", np.dtype("<f4"), -(-n // INT8_BLOCK))
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError("field 'scale': scales must be finite and >= 0")
        if (q == -128).any():
            raise ValueError("field 'data': -128 is out of range (int8 values are in [-127, 127])")
        out = np.empty(n, dtype)
        (q_blocks, q_tail), (out_blocks, out_tail) = _blocks(q), _blocks(out)
        with np.errstate(over="ignore"):  # (an overflow is refused just below)
            out_blocks[:] = q_blocks * scale[: len(q_blocks), None]
            out_tail[:] = q_tail * scale[-1]
        if not np.isfinite(out).all():  # a scale near float32's max times 127 in a smaller float
            raise ValueError("values out of the range of the model's dtype")
        return out


def _blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of a flat array: its whole blocks of INT8_BLOCK values as rows, and the tail after them."""
    full = a.size // INT8_BLOCK * INT8_BLOCK
    return a[:full].reshape(-1, INT8_BLOCK), a[full:]


class TopK(Codec):
    """The ``fraction`` of each tensor's coordinates where it moved most since they were last exchanged
    (``select``): their indices and values. ``fraction`` is None for a codec that only decodes."""

    name = "topk"

    def __init__(self, fraction: float | None = None) -> None:
        self.fraction = fraction

    @property
    def spec(self) -> str:
        return f"topk:{self.fraction:g}"

    def ratio(self) -> float:
        f = self.fraction or 1.0
        return 2 * f  # uint32 index + float32 value per coordinate sent; the reply adds F (values only)

    def count(self, n: int) -> int:
        return max(1, min(n, math.ceil((self.fraction or 1.0) * n)))

    def select(self, moved: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices (uint32, increasing) of ``count`` coordinates of a flat tensor: the largest entries of
        ``|moved|`` (how far each moved since it was last exchanged), but for a RANDOM_SHARE of them drawn
        uniformly from the rest. The random share keeps every coordinate in circulation: one that no longer
        moves here can still disagree with a peer's (each node last averaged it with another partner), and
        without training nothing moves at all."""
        n = moved.size
        k = self.count(n)
        if k >= n:
            return np.arange(n, dtype=INDEX_DTYPE)
        k_top = k - int(k * RANDOM_SHARE)
        shift = int(rng.integers(n))  # ties (coordinates that did not move) go to different ones each time
        top = np.empty(0, np.int64)
        if k_top:
            top = (np.argpartition(np.roll(np.abs(moved), -shift), n - k_top)[n - k_top :] + shift) % n
        if k_top < k:
            draw = rng.choice(n, size=k, replace=False)  # (for k of 10% of n, numpy permutes n indices)
            top = np.concatenate([top, draw[~np.isin(draw, top)][: k - k_top]])
        return np.sort(top).astype(INDEX_DTYPE)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise TypeError("top-k sends values at chosen indices: see wire.encode")

    def decode(self, fields: Mapping[str, object], dtype: np.dtype, n: int) -> np.ndarray:
        raise TypeError("top-k values are decoded with their indices: see decode_indices")


def decode_indices(fields: Mapping[str, object], n: int) -> np.ndarray:
    """The ``idx`` field of a top-k tensor of ``n`` values: uint32, strictly increasing, below ``n``."""
    raw = fields.get("idx")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ValueError("field 'idx' must be bytes")
    nbytes = memoryview(raw).nbytes
    if nbytes % INDEX_DTYPE.itemsize or not 0 < nbytes // INDEX_DTYPE.itemsize <= n:
        raise ValueError(f"field 'idx': {nbytes} bytes, expected 4 per index and 1 to {n} indices")
    idx = np.frombuffer(raw, INDEX_DTYPE)
    if idx[-1] >= n or (idx.size > 1 and not (idx[1:] > idx[:-1]).all()):
        raise ValueError(f"field 'idx': indices must be strictly increasing and below {n}")
    return idx


def decode_values(fields: Mapping[str, object], dtype: np.dtype, k: int) -> np.ndarray:
    """The ``data`` field of a top-k tensor with ``k`` indices: its values, a new writable array."""
    return _field(fields, "data", dtype.newbyteorder("<"), k).copy()


CODECS: dict[str, Callable[[], Codec]] = {
    "none": NoCompression,
    "fp16": Float16,
    "bf16": BFloat16,
    "int8": Int8,
    "topk": TopK,
}


def parse(spec: str) -> Codec:
    """The codec for a ``--compress`` value; ValueError with a one-line message when it does not parse."""
    name, sep, arg = spec.partition(":")
    if name == "topk":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction <= MAX_TOPK_FRACTION:
            raise ValueError(
                f"compress {spec!r}: topk needs a fraction in (0, {MAX_TOPK_FRACTION}], as in topk:0.1 (beyond "
                "half, an index and a value per coordinate cost more than sending the tensor whole)"
            )
        return TopK(fraction)
    if name in CODECS and not sep:
        return CODECS[name]()
    raise ValueError(f"compress {spec!r}: expected none, fp16, bf16, int8 or topk:FRACTION")


def for_wire(name: str) -> Codec:
    """The codec a message declares (``compress``); ValueError for one this node does not know."""
    if name not in CODECS:
        raise ValueError(f"unknown compression {name[:40]!r} (known: {', '.join(CODECS)})")
    return CODECS[name]()


def check_options(spec: str, rule: str, robust: bool = False) -> Codec:
    """The codec of ``--compress`` for a node merging with ``rule`` (``robust``: with --clip-radius);
    ValueError with a one-line message."""
    codec = parse(spec)
    if not codec.lossless and rule == "pushsum":
        raise ValueError(
            f"compress {spec} with merge pushsum: push-sum conserves the weighted sum of the models, which a lossy "
            "codec's residuals do not (and top-k averages part of a model); use average, age or samples"
        )
    if codec.name == "topk" and robust:
        raise ValueError(
            "compress topk with clip-radius: distances over the chosen coordinates are not comparable with the "
            "distances of whole models that set the radius"
        )
    return codec

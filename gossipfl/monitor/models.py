"""The consensus distance of models read from ``GET /v1/model`` (a gossip message, msgpack).

The network view knows no task, so a model's shape comes from the message itself: the dtype and shape
each tensor declares become the spec that ``wire.decode`` then checks the message against (sizes, finite
values). Only what a node serves is read: an uncompressed message (version 2, no ``compress``) of
floating-point tensors. Its values are then the body's own bytes: a model costs its size on the wire, held
as views into the body, never widened or copied whole. Only models of one shape can be compared: the
largest group of nodes whose models agree in shape is measured, 16 MiB of float64 at a time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gossipfl.common import msgview
from gossipfl.protocol import wire

MAX_TENSORS = 10_000
MAX_DIMS = 8
MAX_MODEL_BYTES = 1 << 30  # a /v1/model body
MAX_VALUES = MAX_MODEL_BYTES // 2  # (no float takes less than 2 bytes: a body within the limit holds no more)
FLOATS = ("<f2", "<f4", "<f8")  # what a node's parameters and buffers are sent as
WORKING_BYTES = 16 << 20  # float64 scratch of one measure, however many models it compares


@dataclass(frozen=True)
class Model:
    """One node's model as read: its shape digest and its tensors, flat, in name order (views into the body)."""

    digest: str
    parts: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[str, tuple[int, ...]]:
        """What models must share to be compared: names, dtypes and shapes, and the flat sizes of the parts."""
        return self.digest, tuple(p.size for p in self.parts)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def spec_of(body: bytes | bytearray) -> dict[str, wire.TensorSpec]:
    """The tensors a model message declares; WireError when it declares none or nonsense, is compressed, or
    holds anything but floats."""
    try:
        obj = msgview.loads(body)
    except ValueError as e:
        raise wire.WireError(f"malformed msgpack: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != wire.PROTOCOL_VERSION or "compress" in obj:
        raise wire.WireError(f"not an uncompressed model (protocol version {wire.PROTOCOL_VERSION})")
    params = obj.get("params")
    if not isinstance(params, dict) or not 0 < len(params) <= MAX_TENSORS:
        raise wire.WireError("not a model: no params map")
    spec, values = {}, 0
    for name, t in params.items():
        dtype = t.get("dtype") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise wire.WireError("not a model: a tensor without a name, dtype or shape")
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise wire.WireError(f"tensor {name[:40]!r}: bad shape")
        if dtype not in FLOATS:
            raise wire.WireError(f"tensor {name[:40]!r}: dtype {dtype[:20]!r} is not {', '.join(FLOATS)}")
        values += math.prod(shape)  # (Python integers: a declared 2**64 does not wrap)
        if values > MAX_VALUES:
            raise wire.WireError(f"a model of more than {MAX_VALUES} values")
        spec[name] = wire.TensorSpec(dtype, tuple(shape))
    return spec


def model_of(body: bytes | bytearray) -> Model:
    """The model in a ``/v1/model`` body (views into a bytearray body); WireError for a bad message."""
    spec = spec_of(body)
    params = wire.decode(body, spec).params
    return Model(wire.spec_digest(spec), tuple(np.asarray(params[k]).reshape(-1) for k in sorted(params)))


def consensus(models: Mapping[str, Model]) -> tuple[float, float | None, int] | None:
    """(distance, distance relative to the mean's norm, nodes measured) over the largest group of models of
    one shape: the root mean square distance of the models from their mean. None with fewer than two, or
    when the distance is not a finite number (models so far apart that it overflows)."""
    if not models:
        return None
    shape, n = Counter(m.shape for m in models.values()).most_common(1)[0]
    if n < 2:
        return None
    squared, mean_squared = _spread([m for m in models.values() if m.shape == shape])
    distance = math.sqrt(squared)
    if not math.isfinite(distance):
        return None
    norm = math.sqrt(mean_squared)
    return distance, (distance / norm if 0 < norm < math.inf else None), n


def _spread(group: Sequence[Model]) -> tuple[float, float]:
    """(mean over the models of ||x_i - mean||², ||mean||²), exactly as with the whole vectors (two passes:
    the mean, then the distances to it), a chunk of every model at a time: WORKING_BYTES of float64 at most,
    never a copy of a whole model."""
    n = len(group)
    step = max(1024, WORKING_BYTES // (8 * (n + 1)))
    squared = mean_squared = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for pieces in zip(*(_chunks(m.parts, step) for m in group), strict=True):
            mean = pieces[0].copy()
            for p in pieces[1:]:
                mean += p
            mean /= n
            mean_squared += float(mean @ mean)
            for p in pieces:
                p -= mean
                squared += float(p @ p)
            del pieces, mean, p  # (before the next chunks are made: one chunk of each model alive at a time)
    return squared / n, mean_squared


def _chunks(parts: Sequence[np.ndarray], step: int) -> Iterator[np.ndarray]:
    """The values of ``parts`` in order, as fresh float64 arrays of ``step`` values (the last shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for part in parts:
        start = 0
        while start < part.size:
            take = min(step - held, part.size - start)
            pending.append(part[start : start + take])
            held, start = held + take, start + take
            if held == step:
                yield np.concatenate(pending, dtype=np.float64)
                pending, held = [], 0
    if pending:
        yield np.concatenate(pending, dtype=np.float64)

"""The consensus distance of models read from ``GET /v1/model`` (a gossip message, msgpack).

The network view knows no task, so a model's shape comes from the message itself: the dtype and shape
each tensor declares become the spec that ``wire.decode`` then checks the message against (sizes, finite
values). Only models of one shape can be compared: the largest group of nodes whose models agree in shape
is measured, the others left out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from gossipfl.common import msgview
from gossipfl.protocol import wire
from gossipfl.protocol.consensus import consensus_distance, flatten, network_mean

MAX_TENSORS = 10_000
MAX_DIMS = 8


def spec_of(body: bytes | bytearray) -> dict[str, wire.TensorSpec]:
    """The tensors a model message declares; WireError when it declares none or nonsense."""
    try:
        obj = msgview.loads(body)
    except ValueError as e:
        raise wire.WireError(f"malformed msgpack: {e}") from None
    params = obj.get("params") if isinstance(obj, dict) else None
    if not isinstance(params, dict) or not 0 < len(params) <= MAX_TENSORS:
        raise wire.WireError("not a model: no params map")
    spec = {}
    for name, t in params.items():
        dtype = t.get("dtype") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise wire.WireError("not a model: a tensor without a name, dtype or shape")
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise wire.WireError(f"tensor {name[:40]!r}: bad shape")
        try:
            kind = np.dtype(dtype).kind
        except TypeError:
            raise wire.WireError(f"tensor {name[:40]!r}: bad dtype") from None
        if kind not in "fiu" or not dtype.startswith(("<", ">", "|")):
            raise wire.WireError(f"tensor {name[:40]!r}: dtype {dtype[:20]!r} is not a number type")
        spec[name] = wire.TensorSpec(dtype, tuple(shape))
    return spec


def vector_of(body: bytes | bytearray) -> tuple[str, np.ndarray]:
    """(the model's shape digest, its parameters as one float64 vector); WireError for a bad message."""
    spec = spec_of(body)
    return wire.spec_digest(spec), flatten(wire.decode(body, spec).params)


def consensus(vectors: Mapping[str, tuple[str, np.ndarray]]) -> tuple[float, float | None, int] | None:
    """(distance, distance relative to the mean's norm, nodes measured) over the largest group of models of
    one shape; None with fewer than two."""
    if not vectors:
        return None
    shape, n = Counter(digest for digest, _ in vectors.values()).most_common(1)[0]
    if n < 2:
        return None
    group = [v for digest, v in vectors.values() if digest == shape]
    distance = consensus_distance(group)
    norm = float(np.linalg.norm(network_mean(group)))
    return distance, (distance / norm if norm > 0 else None), n

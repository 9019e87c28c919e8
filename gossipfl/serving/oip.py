"""Open Inference Protocol v2 (KServe / Triton REST): pure encoding and validation, no I/O.

An infer request is a JSON header, optionally followed by raw tensor bytes (the binary tensor data
extension): ``Inference-Header-Content-Length`` says where the JSON ends, and each input with
``parameters.binary_data_size`` takes that many bytes, in order. Outputs are JSON (flattened,
row-major) unless the request asks for binary outputs, per output (``parameters.binary_data``) or for
all (``parameters.binary_data_output``). Every problem raises ``InferError`` naming what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)

# OIP datatype <-> numpy dtype (BYTES and BF16 are not served: every gossipfl tensor is numeric)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


def datatype_of(dtype: np.dtype | str) -> str:
    dt = np.dtype(dtype)
    for name, d in DATATYPES.items():
        if d == dt:
            return name
    raise ValueError(f"numpy dtype {dt} has no Open Inference Protocol datatype")


class InferError(ValueError):
    """A request the server cannot run; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype, e.g. "FP32"
    shape: tuple[int, ...]  # -1 for the batch axis

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Requested:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[Requested, ...]


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "gossipfl", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [t.metadata() for t in inputs],
        "outputs": [t.metadata() for t in outputs],
    }


# -- requests -------------------------------------------------------------------------------------
def parse_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch: int,
) -> InferRequest:
    """Validate an infer request against the model's input and output specs and decode its tensors."""
    header, binary = _split(body, header_length)
    try:
        doc = json.loads(header, parse_constant=_no_constant)
    except RecursionError:
        raise InferError("request header nests too deeply") from None
    except ValueError as e:  # also UnicodeDecodeError, and ints longer than Python converts
        raise InferError(f"request header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InferError("request must be a JSON object with an 'inputs' list")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InferError("'id' must be a string")
    params = _parameters(doc, "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InferError("'inputs' must be a non-empty list of tensors")

    specs = {t.name: t for t in inputs}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise InferError("each input must be a JSON object")
        name = item.get("name")
        spec = specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InferError(f"unknown input {name!r}; expected {_names(inputs)}")
        if name in tensors:
            raise InferError(f"input {name!r} given twice")
        shape = _shape(item, spec, max_batch)
        dtype = DATATYPES[spec.datatype]
        if item.get("datatype") != spec.datatype:
            raise InferError(f"input {name!r}: datatype {item.get('datatype')!r}, expected {spec.datatype!r}")
        size = _parameters(item, f"input {name!r}").get("binary_data_size")
        count = math.prod(shape)
        if size is not None:
            if "data" in item:
                raise InferError(f"input {name!r}: both 'data' and binary_data_size given")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InferError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise InferError(
                    f"input {name!r}: binary_data_size {size}, expected {count * dtype.itemsize} bytes "
                    f"({count} x {spec.datatype} for shape {list(shape)})"
                )
            if offset + size > len(binary):
                raise InferError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            tensors[name] = _finite(
                np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset).reshape(shape), name
            )
            offset += size
        else:
            if "data" not in item:
                raise InferError(f"input {name!r}: no 'data' and no binary_data_size")
            tensors[name] = _finite(_from_json(item["data"], shape, dtype, name), name)
    if offset != len(binary):
        raise InferError(f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims")
    missing = [t.name for t in inputs if t.name not in tensors]
    if missing:
        raise InferError(f"missing input(s) {', '.join(map(repr, missing))}")
    batches = {a.shape[0] for a in tensors.values()}
    if len(batches) > 1:
        raise InferError(f"inputs disagree on the batch size: {sorted(batches)}")
    return InferRequest(req_id, tensors, _requested(doc, params, outputs))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows; inputs must be finite numbers")


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InferError(f"{HEADER} {header_length!r} is not an integer") from None
    if n < 0:
        raise InferError(f"{HEADER} must be >= 0, got {n}")
    if n > len(body):
        raise InferError(f"{HEADER} {n} is larger than the body ({len(body)} bytes)")
    return body[:n], body[n:]


def _parameters(doc: dict, where: str) -> dict:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InferError(f"{where}: 'parameters' must be a JSON object")
    return params


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(repr(t.name) for t in specs)


def _shape(item: dict, spec: TensorSpec, max_batch: int) -> tuple[int, ...]:
    shape = item.get("shape")
    name = spec.name
    expected = [("batch" if d == -1 else d) for d in spec.shape]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InferError(f"input {name!r}: 'shape' must be a list of integers, expected {expected}")
    if len(shape) != len(spec.shape) or any(d != s for d, s in zip(shape, spec.shape, strict=True) if s != -1):
        raise InferError(f"input {name!r}: shape {shape}, expected {expected}")
    for d, s in zip(shape, spec.shape, strict=True):
        if s == -1 and not 1 <= d <= max_batch:
            raise InferError(f"input {name!r}: batch size {d}, expected 1 to {max_batch}")
    return tuple(shape)


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InferError(f"input {name!r}: NaN or infinite value, expected finite numbers")
    return arr


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for v in data:
            yield from _flatten(v)
    else:
        yield data


def _nesting(data: Any, name: str, limit: int) -> list[int]:
    """The shape of a nested JSON list; InferError when it is ragged (siblings of different lengths, or
    lists mixed with numbers), or nests deeper than ``limit`` lists (without a limit, a list nested a few
    hundred deep, which JSON parses, would exhaust the stack here)."""
    if not isinstance(data, list):
        return []
    if limit <= 0:
        raise InferError(f"input {name!r}: 'data' nests deeper than its shape")
    inner = [_nesting(v, name, limit - 1) for v in data]
    if any(i != inner[0] for i in inner[1:]) or (
        inner and any(isinstance(v, list) for v in data) and not all(isinstance(v, list) for v in data)
    ):
        raise InferError(f"input {name!r}: 'data' is a ragged nested list; give it flat or nested like the shape")
    return [len(data), *(inner[0] if inner else [])]


def _from_json(data: Any, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    allowed = [[*shape[:k], math.prod(shape[k:])] for k in range(len(shape))] or [[1]]
    nesting = _nesting(data, name, max(map(len, allowed)))
    if len(nesting) > 1 and nesting not in allowed:
        raise InferError(f"input {name!r}: 'data' nested as {nesting}, expected flat or nested as {list(shape)}")
    values = list(_flatten(data))
    count = math.prod(shape)
    if len(values) != count:
        raise InferError(f"input {name!r}: {len(values)} values in 'data', expected {count} for shape {list(shape)}")
    want_bool = dtype == np.bool_
    for v in values:
        ok = isinstance(v, bool) if want_bool else isinstance(v, int | float) and not isinstance(v, bool)
        if not ok:
            kind = "true/false" if want_bool else "numbers"
            raise InferError(f"input {name!r}: non-numeric value {v!r} in 'data', expected {kind}")
        if dtype.kind in "iu" and isinstance(v, float) and not v.is_integer():
            raise InferError(f"input {name!r}: value {v!r} is not an integer, expected {datatype_of(dtype)}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            arr = np.asarray(values, dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError, TypeError):
        raise InferError(f"input {name!r}: a value does not fit in {datatype_of(dtype)}") from None
    return arr.reshape(shape)


def _requested(doc: dict, params: dict, outputs: Sequence[TensorSpec]) -> tuple[Requested, ...]:
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InferError("binary_data_output must be true or false")
    raw = doc.get("outputs")
    if raw is None:
        return tuple(Requested(t.name, binary_all) for t in outputs)
    if not isinstance(raw, list):
        raise InferError("'outputs' must be a list")
    known = {t.name for t in outputs}
    asked: list[Requested] = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in known:
            raise InferError(f"unknown output {name!r}; expected {_names(outputs)}")
        p = _parameters(item, f"output {name!r}")
        if p.get("classification", 0):
            raise InferError("the classification extension is not supported; ask for 'probabilities' instead")
        binary = p.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise InferError(f"output {name!r}: binary_data must be true or false")
        asked.append(Requested(name, binary))
    return tuple(asked)


# -- responses ------------------------------------------------------------------------------------
def encode_response(
    model: str, request_id: str | None, results: dict[str, np.ndarray], requested: Sequence[Requested]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    outs, chunks = [], []
    for r in requested:
        arr = np.ascontiguousarray(results[r.name])
        entry: dict[str, Any] = {"name": r.name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if r.binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outs}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)

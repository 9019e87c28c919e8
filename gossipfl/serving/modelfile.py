"""Model files: the served model as safetensors (no pickle), with gossipfl's metadata.

``safetensors.torch.load(data)`` or ``safetensors.torch.load_file(path)`` give a state dict that the
task's ``build_model()`` loads with ``load_state_dict``.

The file is written as pieces (``Chunks``): the header, then each tensor straight from its memory, never
joined, so serving a 400 MB model costs no 400 MB buffer. The format (huggingface/safetensors, README
"Format"): an 8-byte little-endian header size N, N bytes of JSON (``__metadata__``: strings only; per
tensor its dtype, shape and ``data_offsets`` [begin, end) into the data that follows, contiguous, in
order), padded with spaces to a multiple of 8, then the data. ``safetensors`` itself can only build the
whole file in memory; tests check that it reads ours back."""

from __future__ import annotations

import json

import numpy as np

from gossipfl.common.chunks import Chunks
from gossipfl.version import __version__

CONTENT_TYPE = "application/octet-stream"
_DTYPES = {
    "f2": "F16", "f4": "F32", "f8": "F64", "i1": "I8", "i2": "I16", "i4": "I32", "i8": "I64",
    "u1": "U8", "u2": "U16", "u4": "U32", "u8": "U64", "b1": "BOOL",
}  # fmt: skip


def encode(state: dict[str, np.ndarray], *, node_id: str, age: int, task: str) -> Chunks:
    """A safetensors file of ``state``; metadata (strings only, as the format requires): node_id, age,
    task, gossipfl version, and ``format: pt`` (what Hugging Face loaders look for)."""
    metadata = {"format": "pt", "node_id": node_id, "age": str(age), "task": task, "gossipfl": __version__}
    header: dict[str, object] = {"__metadata__": metadata}
    arrays, offset = [], 0
    for name in sorted(state):
        a = np.asarray(state[name])
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
        code = _DTYPES.get(a.dtype.str[1:])
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        a = np.require(a, requirements="C")  # keeps 0-d shapes
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return Chunks([len(text).to_bytes(8, "little"), text, *(a.reshape(-1).view(np.uint8) for a in arrays)])

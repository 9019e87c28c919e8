"""The checkpoint format, pure: a Learner's ``Saved`` state and the node's other state (a JSON-able dict)
to and from two byte strings: a safetensors file for the tensors and a small JSON document for the rest.
Nothing here is ever unpickled; a file that does not decode raises ``CheckpointError`` with the reason."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from gossipfl.learning.learner import MAX_AGE, Saved

FORMAT = 1  # bumped when the layout changes; a checkpoint of another format is set aside, not read


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, truncated, another format, or another node's)."""


def encode(saved: Saved, meta: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(tensors file, JSON document) of a checkpoint; the document holds the tensors file's digest."""
    tensors = {f"model/{k}": v for k, v in saved.model.items()}
    tensors.update({f"optimizer/{k}": v for k, v in saved.optimizer.items()})
    tensors["learner/rng"] = saved.rng
    tensors["learner/order"] = saved.order
    blob = save({k: np.require(v, requirements="C") for k, v in tensors.items()})
    doc = {
        "format": FORMAT,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "learner": {
            "age": saved.age,
            "steps": saved.steps,
            "merges": saved.merges,
            "weight": saved.weight,
            "cursor": saved.cursor,
            "optimizer_scalars": saved.optimizer_scalars,
        },
        **meta,
    }
    return blob, doc


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()


def loads(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CheckpointError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"format {doc.get('format')!r}, this version reads format {FORMAT}")
    return doc


def decode(blob: bytes, doc: dict[str, Any]) -> Saved:
    """The Learner state of a checkpoint (CheckpointError if the tensors file is not the one the document
    names, or either is incomplete)."""
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise CheckpointError("the tensors file does not match its digest (truncated or changed)")
    try:
        tensors = load(blob)
        learner = doc["learner"]
        scalars = {str(k): float(v) for k, v in learner["optimizer_scalars"].items()}
        return Saved(
            model={k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
            optimizer={k[10:]: v for k, v in tensors.items() if k.startswith("optimizer/")},
            optimizer_scalars=scalars,
            age=_count(learner["age"]),
            steps=_count(learner["steps"]),
            merges=_count(learner["merges"]),
            weight=float(learner["weight"]),
            rng=tensors["learner/rng"],
            order=tensors["learner/order"],
            cursor=_count(learner["cursor"]),
        )
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors, a missing key, a value of the wrong type
        raise CheckpointError(f"incomplete: {type(e).__name__}: {e}") from None


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AGE:
        raise CheckpointError(f"counter {value!r} is not an integer from 0 to 2**53")
    return value

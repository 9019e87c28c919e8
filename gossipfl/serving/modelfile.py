"""Model files: the served model as safetensors (no pickle), with gossipfl's metadata.

``safetensors.torch.load(data)`` or ``safetensors.torch.load_file(path)`` give a state dict that the
task's ``build_model()`` loads with ``load_state_dict``.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save

from gossipfl.version import __version__

CONTENT_TYPE = "application/octet-stream"


def encode(state: dict[str, np.ndarray], *, node_id: str, age: int, task: str) -> bytes:
    """A safetensors file of ``state``; metadata (strings only, as the format requires): node_id, age,
    task, gossipfl version, and ``format: pt`` (what Hugging Face loaders look for)."""
    metadata = {"format": "pt", "node_id": node_id, "age": str(age), "task": task, "gossipfl": __version__}
    return save({k: np.require(v, requirements="C") for k, v in state.items()}, metadata=metadata)  # keeps 0-d shapes

"""The served model file: written as pieces (header, then each tensor from its own memory), read back by
the safetensors library exactly."""

import json

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from gossipfl.serving import modelfile
from gossipfl.version import __version__


def test_the_pieces_make_a_safetensors_file_the_library_reads_exactly():
    rng = np.random.default_rng(0)
    state = {
        "layer.weight": rng.normal(size=(300, 20)).astype(np.float32),
        "layer.bias": rng.normal(size=20).astype(np.float64),
        "bn.num_batches_tracked": np.array(7, np.int64),  # 0-d, an integer buffer
        "half": rng.normal(size=5).astype(np.float16),
        "mask": np.array([True, False]),
    }
    body = modelfile.encode(state, node_id="n1", age=12, task="digits")
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), state["layer.weight"]) for p in body)  # not copied
    data = body.tobytes()
    assert len(data) == len(body) and int.from_bytes(data[:8], "little") % 8 == 0
    loaded = safetensors.numpy.load(data)
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert np.array_equal(loaded[name], value)
    tensors = safetensors.torch.load(data)
    assert tensors["bn.num_batches_tracked"].dtype == torch.int64 and tensors["bn.num_batches_tracked"].item() == 7
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {
        "format": "pt", "node_id": "n1", "age": "12", "task": "digits", "gossipfl": __version__
    }  # fmt: skip

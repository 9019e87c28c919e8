"""The Open Inference Protocol codec as pure functions: requests in both encodings, responses, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.serving import oip
from gossipfl.serving.client import decode_response

INPUTS = (oip.TensorSpec("input", "FP32", (-1, 4)),)
OUTPUTS = (oip.TensorSpec("probabilities", "FP32", (-1, 3)), oip.TensorSpec("label", "INT64", (-1,)))


def parse(doc: dict, binary: bytes = b"", header: bool = False) -> oip.InferRequest:
    head = json.dumps(doc).encode()
    return oip.parse_request(head + binary, str(len(head)) if header else None, INPUTS, OUTPUTS, max_batch=8)


def test_nested_and_flat_json_data_give_the_same_tensor():
    rows = [[1, 2, 3, 4], [5.5, 6, 7, 8]]
    nested = parse({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": rows}]})
    flat = parse({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": sum(rows, [])}]})
    np.testing.assert_array_equal(nested.inputs["input"], flat.inputs["input"])
    assert nested.inputs["input"].dtype == np.float32
    assert nested.outputs == (oip.Requested("probabilities", False), oip.Requested("label", False))


def test_output_selection_and_binary_flags():
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}
    req = parse({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    assert all(r.binary for r in req.outputs)
    req = parse({"inputs": [tensor], "outputs": [{"name": "label", "parameters": {"binary_data": False}}]})
    assert req.outputs == (oip.Requested("label", False),)
    with pytest.raises(oip.InferError, match="classification extension is not supported"):
        parse({"inputs": [tensor], "outputs": [{"name": "label", "parameters": {"classification": 2}}]})


def test_integer_inputs_reject_fractions_and_overflow():
    specs = (oip.TensorSpec("ids", "INT8", (-1,)),)

    def run(data: list) -> np.ndarray:
        body = json.dumps({"inputs": [{"name": "ids", "datatype": "INT8", "shape": [len(data)], "data": data}]})
        return oip.parse_request(body.encode(), None, specs, OUTPUTS, max_batch=8).inputs["ids"]

    assert run([1, -2, 127]).tolist() == [1, -2, 127]
    with pytest.raises(oip.InferError, match="not an integer"):
        run([1.5])
    with pytest.raises(oip.InferError, match="does not fit in INT8"):
        run([300])


@settings(max_examples=50, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.just(4)), elements=st.floats(-1e6, 1e6, width=32)),
    binary_in=st.booleans(),
    binary_out=st.booleans(),
)
def test_request_and_response_round_trip(x, binary_in, binary_out):
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    if binary_in:
        raw = x.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        req = parse({"inputs": [tensor], "parameters": {"binary_data_output": binary_out}}, raw, header=True)
    else:
        tensor["data"] = x.tolist()
        req = parse({"inputs": [tensor], "parameters": {"binary_data_output": binary_out}})
    np.testing.assert_array_equal(req.inputs["input"], x)

    results = {"probabilities": x[:, :3].copy(), "label": np.argmax(x, axis=1).astype(np.int64)}
    body, header_length = oip.encode_response("m", "id-7", results, req.outputs)
    assert (header_length is not None) == binary_out
    out = decode_response(body, None if header_length is None else str(header_length))
    np.testing.assert_array_equal(out["probabilities"], results["probabilities"])
    np.testing.assert_array_equal(out["label"], results["label"])
    assert json.loads(body[: header_length or len(body)])["id"] == "id-7"


def test_inputs_must_agree_on_the_batch():
    specs = (oip.TensorSpec("a", "FP32", (-1, 1)), oip.TensorSpec("b", "FP32", (-1, 1)))
    body = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]},
                {"name": "b", "datatype": "FP32", "shape": [3, 1], "data": [1, 2, 3]},
            ]
        }
    ).encode()
    with pytest.raises(oip.InferError, match="disagree on the batch size"):
        oip.parse_request(body, None, specs, OUTPUTS, max_batch=8)
    one = json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}).encode()
    with pytest.raises(oip.InferError, match="missing input\\(s\\) 'b'"):
        oip.parse_request(one, None, specs, OUTPUTS, max_batch=8)

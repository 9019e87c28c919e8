"""A node as a model server: Open Inference Protocol v2 with the real tritonclient, safetensors download,
`gossipfl pull` / `gossipfl query`, and every bad request answered 4xx without touching the model."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import load as load_safetensors

from gossipfl.learning.tasks.digits import DigitsTask

from .helpers import running

pytestmark = pytest.mark.timeout(120)
TRAIN_STEPS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real node process that trains TRAIN_STEPS steps once (one round, then an hour's pause), so its
    model stays fixed while the tests compare answers."""
    port = _free_port()
    log = tmp_path_factory.mktemp("node") / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(port),
                "--discovery", "static", "--cluster", f"test-{uuid.uuid4().hex[:8]}", "--device", "cpu",
                "--steps-per-round", str(TRAIN_STEPS), "--train-interval", "3600", "--eval-interval", "0.2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = json.loads(_get(url + "/v1/status")[1])
                if status["age"] == TRAIN_STEPS and status["metrics"]["accuracy"] is not None:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"node did not train in time:\n{log.read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def test_split():
    return DigitsTask().load_data(2026).test


def local_model(url: str) -> torch.nn.Module:
    status, body, headers = _get(url + "/v1/model?format=safetensors")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    model = DigitsTask().build_model()
    model.load_state_dict(load_safetensors(body))  # strict: every parameter and buffer is there
    return model.eval()


def test_tritonclient_health_and_metadata(served):
    client = triton.InferenceServerClient(url=served.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta["name"] == "gossipfl" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert model["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert client.get_model_metadata("digits", model_version="1")["name"] == "digits"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_matches_the_downloaded_safetensors(served, test_split, binary):
    x = test_split.x[:50].astype(np.float32)  # raw pixels 0..16: the model scales them itself
    client = triton.InferenceServerClient(url=served.removeprefix("http://"))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    result = client.infer("digits", [inp], outputs=outputs, request_id="r-1")
    probs, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    assert result.get_response()["id"] == "r-1"
    assert probs.dtype == np.float32 and probs.shape == (50, 10) and labels.dtype == np.int64

    with torch.no_grad():
        expected = torch.softmax(local_model(served)(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))
    assert (labels == test_split.y[:50]).mean() > 0.8  # it learned: this is not the initial model


def test_tritonclient_default_request_gets_binary_outputs(served, test_split):
    client = triton.InferenceServerClient(url=served.removeprefix("http://"))
    inp = triton.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(test_split.x[:3].astype(np.float32))
    result = client.infer("digits", [inp])  # no outputs named: the client asks for all, in binary
    assert result.as_numpy("label").shape == (3,)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_pull_and_query_commands(served, test_split, tmp_path):
    out = tmp_path / "model.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "pull", served, "-o", str(out)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "task=digits" in r.stdout and f"age={TRAIN_STEPS}" in r.stdout
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["task"] == "digits" and f.metadata()["age"] == str(TRAIN_STEPS)
    model = DigitsTask().build_model()
    model.load_state_dict(load_safetensors(out.read_bytes()))

    x = test_split.x[:5]
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.json").write_text(json.dumps(x.tolist()))
    with torch.no_grad():
        expected = model(torch.from_numpy(x.astype(np.float32))).argmax(dim=1).tolist()
    for name in ("x.npy", "x.json"):
        r = subprocess.run(
            [sys.executable, "-m", "gossipfl", "query", served, "--input", str(tmp_path / name), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["label"] == expected
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "query", served, "--input", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.splitlines()[0].split() == ["row", "label", "probability"]
    assert [int(line.split()[1]) for line in r.stdout.splitlines()[1:]] == expected


def test_query_errors_are_one_line(served, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), dtype=np.float32))
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "query", served, "--input", str(tmp_path / "bad.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "expects [batch, 64]" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "pull", "http://127.0.0.1:1", "-o", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stderr.startswith("gossipfl: error: http://127.0.0.1:1/v1/model")


def _infer_body(x: np.ndarray, **override) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
    tensor.update(override)
    return json.dumps({"inputs": [tensor]}).encode()


def _binary(x: np.ndarray, size: int | None = None, header_len: int | None = None, **override):
    raw = x.astype("<f4").tobytes()
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    tensor.update(override)
    header = json.dumps({"inputs": [tensor]}).encode()
    length = len(header) if header_len is None else header_len
    return header + raw, {"Inference-Header-Content-Length": str(length)}


def _state(url: str) -> tuple:
    """What a request must not change: model age and version of both models, readiness."""
    status = json.loads(_get(url + "/v1/status")[1])
    return status["age"], status["served"], _get(url + "/v2/health/ready")[0], status["exchanges"]["rejected"]


def _weights(url: str) -> dict[str, torch.Tensor]:
    return load_safetensors(_get(url + "/v1/model?format=safetensors")[1])


X2 = np.arange(128, dtype=np.float32).reshape(2, 64) % 17
BAD_REQUESTS = {
    "unknown model": ("/v2/models/cifar/infer", _infer_body(X2), {}, 404, "unknown model 'cifar'"),
    "wrong input name": ("", _infer_body(X2, name="pixels"), {}, 400, "unknown input 'pixels'; expected 'input'"),
    "wrong datatype": ("", _infer_body(X2, datatype="FP64"), {}, 400, "datatype 'FP64', expected 'FP32'"),
    "wrong shape": ("", _infer_body(X2.reshape(4, 32)), {}, 400, "shape [4, 32], expected ['batch', 64]"),
    "shape/data mismatch": ("", _infer_body(X2, shape=[3, 64]), {}, 400, "nested as [2, 64], expected flat or"),
    "flat count mismatch": ("", _infer_body(X2, shape=[3, 64], data=[1.0] * 128), {}, 400, "128 values in 'data'"),
    "non-numeric": ("", _infer_body(X2, data=["a"] * 128), {}, 400, "non-numeric value 'a'"),
    "numeric string": ("", _infer_body(X2, data=["1.5"] * 128), {}, 400, "non-numeric value '1.5'"),
    "null value": ("", _infer_body(X2, data=[None] * 128), {}, 400, "non-numeric value None"),
    "ragged rows": ("", _infer_body(X2, data=[[1.0] * 64, [1.0] * 63]), {}, 400, "ragged nested list"),
    # the right number of values, ragged: used to be accepted as a 2 x 64 tensor
    "ragged, right count": ("", _infer_body(X2, data=[[1.0] * 65, [1.0] * 63]), {}, 400, "ragged nested list"),
    "mixed nesting": ("", _infer_body(X2, data=[[1.0] * 64, *([1.0] * 64)]), {}, 400, "ragged nested list"),
    "nested the wrong way": ("", _infer_body(X2, data=[[1.0] * 2] * 64), {}, 400, "nested as [64, 2]"),
    "not json": ("", b"{inputs", {}, 400, "not valid JSON"),
    "no inputs": ("", b'{"inputs": []}', {}, 400, "'inputs' must be a non-empty list"),
    "binary byte count": ("", *_binary(X2, size=100), 400, "binary_data_size 100, expected 512 bytes"),
    "header longer than body": ("", *_binary(X2, header_len=10**6), 400, "larger than the body"),
    "header length not a number": ("", _binary(X2)[0], {"Inference-Header-Content-Length": "x"}, 400, "not an integer"),
    "header cut mid-JSON": ("", _infer_body(X2), {"Inference-Header-Content-Length": "10"}, 400, "not valid JSON"),
    "unclaimed bytes": ("", _binary(X2)[0] + b"xx", _binary(X2)[1], 400, "2 bytes of binary data follow"),
    "batch too large": ("", _infer_body(X2, shape=[5000, 64]), {}, 400, "batch size 5000, expected 1 to 4096"),
    "NaN literal": ("", _infer_body(X2).replace(b"16.0", b"NaN"), {}, 400, "NaN is not a number JSON allows"),
    "overflows FP32": ("", _infer_body(X2).replace(b"16.0", b"1e39"), {}, 400, "does not fit in FP32"),
    "infinite": ("", _infer_body(X2).replace(b"16.0", b"1e400"), {}, 400, "NaN or infinite value"),
    "binary NaN": ("", *_binary(np.full((2, 64), np.nan, np.float32)), 400, "NaN or infinite value"),
    "deep nesting": ("", b"[" * 200_000, {}, 400, "nests too deeply"),
    "huge integer": ("", _infer_body(X2).replace(b"16.0", b"1" * 5000), {}, 400, "not valid JSON"),
    "output name is a list": ("", _infer_body(X2)[:-1] + b', "outputs": [{"name": [1]}]}', {}, 400, "unknown output"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_infer_requests_are_4xx_and_change_nothing(served, case):
    path, body, headers, code, fragment = BAD_REQUESTS[case]
    before, state = _weights(served), _state(served)
    status, reply, _ = _post(served + (path or "/v2/models/digits/infer"), body, headers)
    assert status == code, reply
    assert fragment in json.loads(reply)["error"]
    after = _weights(served)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _state(served) == state
    assert _post(served + "/v2/models/digits/infer", _infer_body(X2))[0] == 200  # still serving


def test_unknown_output_name_and_oversized_bodies(served):
    body = json.dumps(
        {"inputs": json.loads(_infer_body(X2))["inputs"], "outputs": [{"name": "logits"}]}
    ).encode()  # fmt: skip
    status, reply, _ = _post(served + "/v2/models/digits/infer", body)
    assert status == 400 and "unknown output 'logits'" in json.loads(reply)["error"]
    huge = b"[" + b"1.0," * 3_000_000 + b"1.0]"
    status, reply, _ = _post(served + "/v2/models/digits/infer", huge)
    assert status == 413 and "exceeds" in json.loads(reply)["error"]
    import http.client

    conn = http.client.HTTPConnection(served.removeprefix("http://"), timeout=10)
    conn.request("POST", "/v2/models/digits/infer", body=(b"1.0," * 65536 for _ in range(64)), encode_chunked=True)
    resp = conn.getresponse()  # no Content-Length: the limit is enforced while reading, not after
    assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]
    conn.close()
    status, reply, _ = _get(served + "/v1/model?format=onnx")
    assert status == 400 and "expected msgpack or safetensors" in json.loads(reply)["error"]


def _probe(url: str) -> tuple[bool, bool, bool]:
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))  # gevent: one client per thread
    try:
        return client.is_server_live(), client.is_server_ready(), client.is_model_ready("digits")
    finally:
        client.close()


async def test_not_ready_until_trained_or_merged(make_config):
    async with running(make_config(no_train=True)) as (node,):
        assert await asyncio.to_thread(_probe, node.url) == (True, False, False)
        status, reply, _ = await asyncio.to_thread(_get, node.url + "/v2/health/ready")
        assert status == 400 and "not ready" in json.loads(reply)["error"]
        node.learner.train_steps(1)
        assert await asyncio.to_thread(_probe, node.url) == (True, True, True)


async def test_ready_means_the_served_model_is_not_the_initial_one(make_config):
    # a node waiting for its first merge serves its initial model (its local steps are not published
    # until three gossip intervals' worth have passed), so it is not ready yet; a merge makes it ready
    async with running(make_config(gossip_interval=1000)) as (node,):
        await asyncio.sleep(0.5)
        assert node.learner.steps > 0 and not node.ready
        assert await asyncio.to_thread(_probe, node.url) == (True, False, False)
        node.learner.update(lambda s: (s.params, s.age, s.weight))  # what a merge does to the learner
        assert await asyncio.to_thread(_probe, node.url) == (True, True, True)


async def test_a_broken_model_is_the_servers_fault_and_a_wild_input_the_clients(make_config):
    """Defect 10: a model that outputs NaN answered 400, blaming the client. A model whose outputs are
    not finite even for a plain input is broken: 503. A healthy model that overflows on huge inputs: 400."""
    async with running(make_config(no_train=True)) as (node,):
        # ready, and with large weights: finite for ordinary inputs, overflowing for inputs near FP32's limit
        node.learner.update(lambda s: ({k: v * np.float32(1e4) for k, v in s.params.items()}, s.age, s.weight))
        row = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3e38] * 64}]}
        status, reply, _ = await asyncio.to_thread(
            _post, node.url + "/v2/models/digits/infer", json.dumps(row).encode()
        )
        assert status == 400 and "not finite for this input" in json.loads(reply)["error"]
        node.learner.update(lambda s: ({k: np.full_like(v, np.nan) for k, v in s.params.items()}, s.age, s.weight))
        row["inputs"][0]["data"] = [1.0] * 64
        status, reply, _ = await asyncio.to_thread(
            _post, node.url + "/v2/models/digits/infer", json.dumps(row).encode()
        )
        assert status == 503 and "is broken: its outputs are not finite for any input" in json.loads(reply)["error"]

"""A node process with a cluster key and a read token, as users run it: tritonclient with the header, the CLI's
--token and GOSSIPFL_TOKEN, one-line errors; and bad key files stop a node with one line, exit 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .helpers import running
from .test_inference import _free_port

pytestmark = pytest.mark.timeout(120)
TOKEN = "t0ken-for-tests"


def _status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url + "/v1/status", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    d = tmp_path_factory.mktemp("guarded")
    (d / "cluster.key").write_bytes(os.urandom(32))
    (d / "token").write_text(TOKEN + "\n")
    port = _free_port()
    log = d / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(port),
             "--discovery", "static", "--cluster", f"test-{uuid.uuid4().hex[:8]}", "--steps-per-round", "50",
             "--train-interval", "3600", "--secret-file", str(d / "cluster.key"),
             "--read-token-file", str(d / "token")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _status(url, TOKEN) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert TOKEN not in log.read_text()


def test_tritonclient_works_with_the_header_and_is_refused_without(guarded):
    url, _ = guarded
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_live(headers={})  # health stays open
    with pytest.raises(InferenceServerException, match="read token"):
        client.get_model_metadata("digits")
    assert client.get_model_metadata("digits", headers=headers)["name"] == "digits"
    inp = triton.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 64), dtype=np.float32))
    result = client.infer("digits", [inp], headers=headers)
    assert result.as_numpy("label").shape == (2,)
    with pytest.raises(InferenceServerException):
        client.infer("digits", [inp])


def test_the_cli_takes_the_token_from_an_option_or_the_environment(guarded, tmp_path):
    url, _ = guarded
    env = {k: v for k, v in os.environ.items() if k != "GOSSIPFL_TOKEN"}
    cli = [sys.executable, "-m", "gossipfl"]
    out = tmp_path / "m.safetensors"
    r = subprocess.run([*cli, "pull", url, "-o", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "HTTP 401" in r.stderr and "--token" in r.stderr and not out.exists()
    r = subprocess.run([*cli, "pull", url, "-o", str(out), "--token", TOKEN], capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0 and out.stat().st_size > 10_000, r.stderr
    np.save(tmp_path / "x.npy", np.zeros((1, 64), dtype=np.float32))
    r = subprocess.run([*cli, "query", url, "--input", str(tmp_path / "x.npy"), "--json"], capture_output=True,
                       text=True, env={**env, "GOSSIPFL_TOKEN": TOKEN}, timeout=60)  # fmt: skip
    assert r.returncode == 0 and len(json.loads(r.stdout)["label"]) == 1, r.stderr
    r = subprocess.run([*cli, "peers", "--url", url, "--token", TOKEN, "--json"], capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    r = subprocess.run([*cli, "peers", "--url", url], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "HTTP 401" in r.stderr


@pytest.mark.parametrize(
    "content, expected",
    [(b"x" * 31, "31 bytes of key material"), (None, "No such file"), (b"", "0 bytes")],
    ids=["short", "missing", "empty"],
)
def test_a_bad_key_file_is_one_line_and_exit_2(tmp_path, content, expected):
    key = tmp_path / "k"
    if content is not None:
        key.write_bytes(content)
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", "0", "--discovery", "static",
         "--secret-file", str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("gossipfl: error: secret-file") and str(key) in lines[0] and expected in lines[0]


async def test_an_open_node_says_so_once(make_config, caplog):
    caplog.set_level(logging.INFO)
    async with running(make_config(no_train=True)):
        pass
    assert sum("running open" in r.getMessage() for r in caplog.records) == 1

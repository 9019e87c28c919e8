"""The README's serving examples (curl, gossipfl pull/query, tritonclient) run as written against a real node."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
README = Path(__file__).parent.parent / "README.md"
README_PORT = "8470"


def checked_blocks(kind: str) -> list[str]:
    """Fenced blocks that follow a ``<!-- readme-check: KIND -->`` marker."""
    return re.findall(rf"<!-- readme-check: {kind} -->\n```\w*\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def node_port(tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("readme") / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(port),
             "--discovery", "static", "--cluster", f"test-{uuid.uuid4().hex[:8]}",
             "--steps-per-round", "300", "--train-interval", "3600"],  # one round, then fixed: answers comparable
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
                    if json.load(r)["age"] == 300:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(log.read_text())
        yield str(port)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run(cmd: list[str], script: str, port: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        cmd, input=script.replace(README_PORT, port), cwd=cwd, env=env, capture_output=True, text=True, timeout=90
    )


def test_readme_shell_examples_run(node_port, tmp_path):
    (block,) = checked_blocks("shell")
    r = run(["bash", "-euo", "pipefail"], block, node_port, tmp_path)
    assert r.returncode == 0, r.stderr
    assert '{"ready": true}' in r.stdout and '"model_name":"digits"' in r.stdout
    assert "gossipfl_test_accuracy_ratio" in r.stdout and "saved model.safetensors" in r.stdout
    assert r.stdout.rstrip().splitlines()[-6].split() == ["row", "label", "probability"]
    assert (tmp_path / "model.safetensors").stat().st_size > 10_000


def test_readme_python_example_runs(node_port, tmp_path):
    (shell,) = checked_blocks("shell")
    assert run(["bash", "-euo", "pipefail"], shell, node_port, tmp_path).returncode == 0  # saves model.safetensors
    (block,) = checked_blocks("python")
    r = run([sys.executable, "-"], block, node_port, tmp_path)
    assert r.returncode == 0, r.stderr
    served, local = r.stdout.splitlines()[0], r.stdout.splitlines()[1]
    assert served.split("]")[0] + "]" == local  # the node and the downloaded weights agree on the labels

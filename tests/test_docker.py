"""The image's build inputs and the compose file, read as Docker reads them, and the container health
check against real nodes (plain HTTP, and HTTPS with mutual TLS and a read token). The image itself is
built and run by scripts/container_testbed.sh (podman; not part of the suite)."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gossipfl.common.healthcheck import check, health_url, main

from .helpers import running
from .test_mtls import pki, tls  # noqa: F401  (pki: a fixture)

ROOT = Path(__file__).parent.parent


def _pins() -> dict[str, str]:
    lines = (ROOT / "docker" / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pins.items()}


def test_the_lock_pins_every_runtime_dependency_within_its_range_but_torch_and_gossipfl():
    """A dependency added to pyproject.toml without `docker/lock.sh` fails here, not in a user's build."""
    pins = _pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in map(Requirement, deps):
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # torch comes from the CPU index alone, by TORCH_SPEC
            continue
        assert name in pins, f"{req.name} is not in docker/requirements.lock: run docker/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} but the lock has {pins[name]}"
    assert "gossipfl" not in pins
    cuda = [name for name in pins if name.startswith(("nvidia-", "triton"))]
    assert not cuda, f"a CUDA torch's packages in the lock: {cuda} (docker/lock.sh with a CPU torch index)"


def test_the_dockerfile_installs_the_lock_before_the_source_and_runs_as_a_numeric_user():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    steps = [line for line in text.splitlines() if re.match(r"^[A-Z]+ ", line)]
    order = [s.split()[0] + " " + s.split()[1] for s in steps if s.startswith(("COPY", "RUN"))]
    assert order[:2] == ["COPY docker/requirements.lock", "RUN python3"], order  # dependencies first ...
    assert order.index("COPY gossipfl") > order.index("RUN python3")  # ... then the source
    assert (
        "--no-deps -r /tmp/requirements.lock" in text and '--no-deps ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}' in text
    )
    assert "extra-index-url" not in text  # the CPU index is the only index torch may come from
    assert "USER 10001:10001" in steps and not any(s.startswith("VOLUME") for s in steps)
    assert 'CMD ["gossipfl-healthcheck"]' in text and "OMP_NUM_THREADS=1" in text
    for label in ("version", "revision", "title", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything out, then only what the build copies
    assert {"!pyproject.toml", "!README.md", "!gossipfl/", "!docker/requirements.lock"} <= set(ignore)


def test_the_compose_file_restarts_on_failure_only_checks_health_rotates_logs_and_keeps_state():
    node = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["node"]
    assert node["restart"] == "on-failure:3"
    assert node["healthcheck"]["test"] == ["CMD", "gossipfl-healthcheck"]
    assert node["logging"]["options"]["max-size"] and node["logging"]["options"]["max-file"]
    assert node["environment"]["GOSSIPFL_STATE_DIR"] == "/var/lib/gossipfl"
    assert node["volumes"] == ["state:/var/lib/gossipfl"]
    assert node["read_only"] is True and node["tmpfs"] == ["/tmp"] and node["cap_drop"] == ["ALL"]
    assert node["environment"]["GOSSIPFL_PARTITION"] == "auto/${NODES:-4}" == "auto/" + node["deploy"]["replicas"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gossipfl-healthcheck"] == "gossipfl.common.healthcheck:main"


def test_the_health_url_follows_the_node_settings_of_the_environment():
    assert health_url({}) == "http://127.0.0.1:8470/v2/health/live"
    assert health_url({"GOSSIPFL_PORT": "9000", "GOSSIPFL_TLS_CERT": "/c.crt"}, ready=True) == (
        "https://127.0.0.1:9000/v2/health/ready"
    )
    assert health_url({"GOSSIPFL_HOST": "10.0.0.5"}) == "http://10.0.0.5:8470/v2/health/live"
    assert health_url({"GOSSIPFL_HOST": "0.0.0.0"}) == "http://127.0.0.1:8470/v2/health/live"


async def test_the_health_check_passes_on_a_live_node_and_says_why_not_otherwise(make_config, monkeypatch, capsys):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # as Docker's proxy settings inject: not for a health check
    monkeypatch.setenv("GOSSIPFL_HOST", "127.0.0.1")
    async with running(make_config(no_train=True)) as (node,):
        monkeypatch.setenv("GOSSIPFL_PORT", str(node.port))
        assert await asyncio.to_thread(main, []) == 0
        assert await asyncio.to_thread(main, ["--ready"]) == 1  # no trained or merged model yet
        assert capsys.readouterr().err.strip() == f"gossipfl-healthcheck: {node.url}/v2/health/ready: HTTP 400"
        port = node.port
    monkeypatch.setenv("GOSSIPFL_PORT", str(port))
    assert await asyncio.to_thread(main, ["--timeout", "2"]) == 1  # stopped: nothing listens
    assert "Connection refused" in capsys.readouterr().err


async def test_the_health_check_passes_on_a_members_only_https_node_without_credentials(make_config, pki, tmp_path):  # noqa: F811
    good, _ = pki
    token = tmp_path / "token"
    token.write_text("a-read-token")
    cfg = make_config(id=None, no_train=True, read_token_file=str(token), **tls(good, "n-a"))
    async with running(cfg) as (node,):
        assert node.url.startswith("https://")
        assert await asyncio.to_thread(check, node.url + "/v2/health/live", 4.0) is None
        assert await asyncio.to_thread(check, node.url + "/v1/status", 4.0) == "HTTP 401"  # the token still holds
        plain = await asyncio.to_thread(check, node.url.replace("https", "http") + "/v2/health/live", 4.0)
        assert plain is not None  # plain HTTP gets no answer: why the health check reads GOSSIPFL_TLS_CERT


if __name__ == "__main__":
    pytest.main([__file__])

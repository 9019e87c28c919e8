"""The command line as a user runs it: real processes, signals, exit codes, logs."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from .helpers import running, wait_for

pytestmark = pytest.mark.timeout(120)
LOOP = ["--host", "127.0.0.1", "--mdns-interface", "127.0.0.1"]


def gossipfl(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "gossipfl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        **kw,
    )


async def spawn_node(*args, log_path):
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller's process exit
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gossipfl",
        "node",
        *LOOP,
        *args,
        stdout=log,
        stderr=log,
    )


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--partition", "9/3"], {}, "partition '9/3': needs 0 <= K < N"),
        (["--task", "nope"], {}, "unknown task 'nope'"),
        (["--seeds", "localhost"], {}, "expected host:port"),
        ([], {"GOSSIPFL_GOSSIP_INTERVAL": "soon"}, "GOSSIPFL_GOSSIP_INTERVAL"),
        (["--config", "/nonexistent.toml"], {}, "config /nonexistent.toml"),
        (["--partition-scheme", "dirichlet:zero"], {}, "ALPHA must be a positive number"),
        (["--merge", "median"], {}, "merge 'median': expected one of average, age, samples, pushsum"),
        (["--partition", "63/64", "--partition-scheme", "dirichlet:0.001"], {}, "left a node with fewer than 1"),
        (["--device", "tpu"], {}, "device 'tpu': expected auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:99"], {}, "device cuda:99: not available"),
        (["--compress", "zstd"], {}, "compress 'zstd': expected none, fp16, bf16, int8 or topk:FRACTION"),
        (["--compress", "topk:2"], {}, "compress 'topk:2': topk needs a fraction in (0, 0.5]"),
        (["--compress", "topk:0.1", "--merge", "pushsum"], {}, "compress topk:0.1 with merge pushsum"),
        (["--compress", "int8", "--merge", "pushsum"], {}, "compress int8 with merge pushsum"),
        (["--compress", "topk:0.1", "--clip-radius", "auto"], {}, "compress topk with clip-radius"),
        (
            ["--secure-group", "3", "--compress", "int8", "--secret-file", "/dev/null", "--read-token", "t"],
            {},
            "secure-group with compress",
        ),
        (["--max-upload-rate", "0"], {}, "max-upload-rate '0': the rate must be a finite number"),
        (["--max-upload-rate=-5MB/s"], {}, "max-upload-rate '-5MB/s': the rate must be"),
        ([], {"GOSSIPFL_MAX_UPLOAD_RATE": "fast"}, "max-upload-rate 'fast' is not a rate"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(args, env, fragment):
    r = gossipfl("node", *LOOP, *args, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gossipfl: error:") and fragment in lines[0], r.stderr


def test_port_in_use_is_a_clear_error(unused_tcp_port):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", unused_tcp_port))
        s.listen()
        r = gossipfl("node", *LOOP, "--port", str(unused_tcp_port))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr


@pytest.mark.parametrize("how", [["--log-format", "json"], []])
def test_json_logs_cover_fatal_errors_too(unused_tcp_port, how):
    """With JSON logs every line a node writes is a JSON object, its last word before exiting included (a
    start-up error; a configuration error, the format then from the flag or GOSSIPFL_LOG_FORMAT)."""
    import socket

    env = {} if how else {"GOSSIPFL_LOG_FORMAT": "json"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", unused_tcp_port))
        s.listen()
        taken = gossipfl("node", *LOOP, "--port", str(unused_tcp_port), *how, env=env)
    bad = gossipfl("node", *LOOP, "--lr", "-1", *how, env=env)
    for r, fragment in ((taken, "cannot listen on 127.0.0.1"), (bad, "lr must be > 0")):
        assert r.returncode == 2
        records = [json.loads(line) for line in r.stderr.strip().splitlines()]
        assert records[-1]["level"] == "critical" and fragment in records[-1]["msg"], records


def test_json_logs_cover_other_libraries_and_warnings():
    """aiohttp's, zeroconf's and asyncio's records and Python warnings come out as JSON too, from warning up;
    the package's own at the level asked for; a test runner's handlers on the root logger stay."""
    import io
    import logging
    import warnings

    from gossipfl.common.logs import setup_logging

    top = logging.getLogger()
    before = list(top.handlers)
    out = io.StringIO()
    try:
        setup_logging("json", "info", stream=out)
        logging.getLogger("aiohttp.server").warning("a client went away")
        logging.getLogger("zeroconf").info("chatter below warning")  # not shown
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("gossipfl.node").info("node up")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [(r["logger"], r["level"]) for r in records] == [
            ("aiohttp.server", "warning"), ("asyncio", "error"), ("gossipfl.node", "info"), ("py.warnings", "warning")
        ], records  # fmt: skip
        assert all(h in top.handlers for h in before)
    finally:
        logging.captureWarnings(False)
        top.handlers[:] = before
        logging.getLogger("gossipfl").handlers[:] = []
        logging.getLogger("gossipfl").propagate = True
        logging.getLogger("gossipfl").setLevel(logging.NOTSET)


async def test_sigterm_says_goodbye_and_exits_0(make_config, zc, tmp_path, unused_tcp_port, cluster):
    log_path = tmp_path / "node.log"
    proc = await spawn_node(
        "--cluster",
        cluster,
        "--port",
        str(unused_tcp_port),
        "--id",
        "sub-term",
        "--log-format",
        "json",
        "--gossip-interval",
        "0.3",
        log_path=log_path,
    )
    try:
        async with running(make_config(discovery=("mdns",), gossip_interval=0.3), zeroconf=zc) as (watcher,):
            assert await wait_for(lambda: "sub-term" in watcher.peers, timeout=40), log_path.read_text()
            assert watcher.peers.get("sub-term").url == f"http://127.0.0.1:{unused_tcp_port}"
            assert await wait_for(lambda: watcher.gossiper.stats.ok + watcher.gossiper.stats.served > 0, 10)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            # the goodbye packets remove it from the watcher's table long before any mDNS TTL
            assert await wait_for(lambda: "sub-term" not in watcher.peers, timeout=5)
    finally:
        if proc.returncode is None:
            proc.kill()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert all(r["node"] == "sub-term" for r in records if r["logger"].startswith("gossipfl"))
    assert any("node up" in r["msg"] for r in records) and records[-1]["msg"] == "node stopped"


async def test_a_crashed_peer_is_backed_off_and_the_rest_keep_gossiping(
    make_config, zc, tmp_path, unused_tcp_port, cluster
):
    proc = await spawn_node(
        "--cluster",
        cluster,
        "--port",
        str(unused_tcp_port),
        "--id",
        "sub-crash",
        "--gossip-interval",
        "0.3",
        log_path=tmp_path / "crash.log",
    )
    try:
        cfgs = [make_config(discovery=("mdns",), gossip_interval=0.2, no_train=True, seed=i) for i in range(2)]
        async with running(*cfgs, zeroconf=zc) as (a, b):
            assert await wait_for(lambda: all("sub-crash" in x.peers and len(x.peers) == 2 for x in (a, b)), 40)
            proc.kill()  # SIGKILL: no goodbye, it stays in mDNS caches
            await proc.wait()
            assert await wait_for(
                lambda: a.peers.get("sub-crash").failures + b.peers.get("sub-crash").failures >= 2, timeout=15
            )
            ok_before = a.gossiper.stats.ok + b.gossiper.stats.ok
            assert await wait_for(lambda: a.gossiper.stats.ok + b.gossiper.stats.ok >= ok_before + 3, timeout=15)
            crashed = a.peers.get("sub-crash")
            assert not crashed.alive and crashed.retry_at > 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_peers_command_lists_nodes_on_the_lan(make_config, zc):
    async with running(make_config(discovery=("mdns",), id="visible-node"), zeroconf=zc) as (node,):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gossipfl",
            "peers",
            "--mdns-interface",
            "127.0.0.1",
            "--timeout",
            "4",
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    found = {p["id"]: p for p in json.loads(out)}
    assert found["visible-node"]["url"] == node.url
    assert found["visible-node"]["task"] == "digits" and found["visible-node"]["proto"] == "2"


def test_testbed_runs_nodes_and_writes_results(tmp_path):
    out = tmp_path / "tb"
    r = gossipfl(
        "testbed",
        "--nodes",
        "3",
        "--duration",
        "8",
        "--out",
        str(out),
        "--gossip-interval",
        "0.5",
        "--sample-interval",
        "1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert len(res["nodes"]) == 3 and len(res["final"]) == 3
    assert all(f["exit_code"] == 0 for f in res["final"].values())
    series = [row for row in res["consensus"] if row["consensus_distance"] is not None]
    assert len(series) >= 5 and all(row["nodes_sampled"] == 3 for row in series)
    # the nodes start from one shared model and train on different shards: gossip keeps them within a few
    # percent of the model's norm (measured 1.5-5%; without exchanges they drift apart to about 23% in 8 s)
    assert res["summary"]["consensus_distance_relative_last"] < 0.08
    for node in res["nodes"].values():
        accs = [a for _, a in node["accuracy"] if a is not None]
        assert accs[-1] > accs[0]
    assert "accuracy mean" in r.stdout and "of the mean model's norm" in r.stdout


async def test_a_taken_node_id_is_refused(make_config, zc):
    from gossipfl.node import Node, StartError

    async with running(make_config(discovery=("mdns",), id="twin"), zeroconf=zc):
        with pytest.raises(StartError, match="node id 'twin' is already taken"):
            await Node(make_config(discovery=("mdns",), id="twin"), zeroconf=zc).start()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a private netns")
def test_a_missing_mdns_interface_is_a_clear_error():
    # in a private network namespace (only lo), so nothing can leave this machine whatever happens
    r = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "gossipfl",
            "node",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--mdns-interface",
            "192.0.2.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["gossipfl: error: mDNS on 192.0.2.1: No such device"]


def test_testbed_reports_a_node_that_cannot_start(tmp_path):
    r = gossipfl("testbed", "--nodes", "2", "--duration", "2", "--out", str(tmp_path), "--", "--lr", "-1")
    assert r.returncode == 1
    assert "exited with code 2 during start-up" in r.stderr
    assert "lr must be > 0" in "".join(p.read_text() for p in tmp_path.glob("*.log"))
    bad = gossipfl("testbed", "--task", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "gossipfl: error: unknown task 'nope' (built-in: digits, digits-cnn, synthetic, tabular; "
        "or package.module:factory)"
    ]

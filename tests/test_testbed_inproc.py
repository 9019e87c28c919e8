"""``gossipfl testbed --mode inproc``: all nodes in one process, measured like the process testbed."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


def gossipfl_testbed(*args):
    return subprocess.run(
        [sys.executable, "-m", "gossipfl", "testbed", *args], capture_output=True, text=True, timeout=90
    )


def test_inproc_testbed_trains_and_converges(tmp_path):
    out = tmp_path / "tb"
    r = gossipfl_testbed(
        "--mode", "inproc", "--nodes", "6", "--duration", "6", "--gossip-interval", "0.3", "--out", str(out)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "inproc" and res["options"]["mode"] == "inproc"
    assert len(res["nodes"]) == 6 and len(res["final"]) == 6
    assert all(f["exit_code"] == 0 for f in res["final"].values())
    series = [row for row in res["consensus"] if row["consensus_distance"] is not None]
    assert len(series) >= 5 and all(row["nodes_sampled"] == 6 for row in series)
    assert res["summary"]["consensus_distance_relative_last"] < 0.08  # one shared initial model, kept together
    for node in res["nodes"].values():
        accs = [a for _, a in node["accuracy"] if a is not None]
        assert accs[-1] > accs[0] + 0.3
    assert res["summary"]["startup_s"] > 0 and res["resources"]["peak_rss_mib"] > 0
    assert "accuracy mean" in r.stdout and "nodes in one process (" in r.stdout and "peak RSS" in r.stdout
    assert "node up at" in (out / "nodes.log").read_text()  # node logs go to one file, not the terminal


@pytest.mark.parametrize(("mode", "spawn"), [("inproc", None), ("process", "fork"), ("process", "exec")])
def test_node_options_after_dashes_reach_the_nodes_in_every_mode(tmp_path, mode, spawn):
    out = tmp_path / mode
    args = ["--mode", mode, "--nodes", "2", "--duration", "2", "--out", str(out), "--inproc-workers", "3"]
    r = gossipfl_testbed(*args, *(["--no-fork"] if spawn == "exec" else []), "--", "--merge", "samples")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == mode and res["options"]["extra_node_args"] == ["--merge", "samples"]
    assert [f["merge"]["rule"] for f in res["final"].values()] == ["samples", "samples"]
    assert [f["exit_code"] for f in res["final"].values()] == [0, 0]
    if mode == "inproc":
        assert res["resources"]["workers"] == 3
    else:
        assert res["resources"]["spawn"] == spawn and res["options"]["fork"] == (spawn == "fork")
        assert all("node up at" in (out / f"{node_id}.log").read_text() for node_id in res["final"])


def test_inproc_refuses_bad_node_options_before_starting(tmp_path):
    r = gossipfl_testbed(
        "--mode", "inproc", "--nodes", "2", "--duration", "2", "--out", str(tmp_path), "--", "--lr", "-1"
    )
    assert r.returncode == 2 and r.stderr.strip() == "gossipfl: error: lr must be > 0", r.stderr
    r = gossipfl_testbed("--mode", "inproc", "--out", str(tmp_path), "--", "--no-such-option", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == "gossipfl: error: node options: unrecognized arguments: --no-such-option 1", r.stderr


def test_testbed_runs_a_tabular_task_from_one_data_file(tmp_path):
    """Every node reads the same file and keeps its own shard; the testbed needs the file for the model."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    np.savez(tmp_path / "table.npz", x=x, y=y)
    out = tmp_path / "tb"
    r = gossipfl_testbed(
        "--mode", "inproc", "--nodes", "3", "--duration", "4", "--gossip-interval", "0.3", "--out", str(out),
        "--task", "tabular:classes=4", "--data", str(tmp_path / "table.npz"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    samples = [f["samples"] for f in res["final"].values()]
    assert len(samples) == 3 and sum(samples) == 480  # the 80% train split, cut three ways
    assert res["summary"]["accuracy_mean"] > 0.8
    refused = gossipfl_testbed("--task", "tabular", "--out", str(tmp_path), "--", "--data", "x.npz")
    assert refused.returncode == 2 and "give --data to the testbed" in refused.stderr, refused.stderr
    missing = gossipfl_testbed("--task", "tabular", "--out", str(tmp_path))
    assert missing.returncode == 2 and "needs --data" in missing.stderr, missing.stderr


def test_the_zygote_forks_each_request_and_reports_pids_and_exit_codes(tmp_path):
    """The process testbed's zygote (gossipfl/testbed/zygote.py): one child per request, running what
    ``python -m gossipfl ARGV`` runs with its output in the log; the exit code of each, then it exits."""
    import subprocess
    import sys

    requests = [
        {"id": "ok", "argv": ["--version"], "log": str(tmp_path / "ok.log")},
        {"id": "bad", "argv": ["node", "--lr", "-1"], "log": str(tmp_path / "bad.log")},
    ]
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl.testbed.zygote", "gossipfl.cli"],
        input="".join(json.dumps(q) + "\n" for q in requests),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    pids = {m["id"]: m["pid"] for m in lines if "pid" in m}
    assert set(pids) == {"ok", "bad"} and len(set(pids.values())) == 2
    assert {m["id"]: m["exit"] for m in lines if "exit" in m} == {"ok": 0, "bad": 2}
    assert (tmp_path / "ok.log").read_text().strip().startswith("gossipfl ")
    assert "lr must be > 0" in (tmp_path / "bad.log").read_text()


async def _wait_all_up(nodes, timeout=60.0):
    import asyncio
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            try:
                await asyncio.to_thread(urllib.request.urlopen, node.url + "/v1/status", None, 2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"{node.id} never answered"
                await asyncio.sleep(0.2)


def _exists(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_forked_nodes_are_stopped_even_when_the_zygote_dies(tmp_path):
    import os
    import signal
    import time

    from gossipfl.testbed.forked import ForkedProcessLauncher
    from gossipfl.testbed.options import TestbedOptions

    launcher = ForkedProcessLauncher(TestbedOptions(nodes=2, out=str(tmp_path)), tmp_path)
    nodes = await launcher.start(["zd-a", "zd-b"], "zygote-death")
    await _wait_all_up(nodes)
    pids = list(launcher._pids.values())
    os.kill(launcher._zygote.pid, signal.SIGKILL)
    await launcher._gone.wait()
    t0 = time.monotonic()
    codes = await launcher.stop()
    assert time.monotonic() - t0 < 15  # not 30 s per node waiting for reports that cannot come
    assert codes == {"zd-a": None, "zd-b": None}  # stopped, exit codes unknown without the zygote
    assert not any(_exists(p) for p in pids)
    assert all("node stopped" in (tmp_path / f"{n}.log").read_text() for n in ("zd-a", "zd-b"))


async def test_an_interrupted_start_leaves_no_node_behind(tmp_path):
    import asyncio

    from gossipfl.testbed.forked import ForkedProcessLauncher
    from gossipfl.testbed.options import TestbedOptions

    launcher = ForkedProcessLauncher(TestbedOptions(nodes=2, out=str(tmp_path)), tmp_path)
    start = asyncio.ensure_future(launcher.start(["ia-a", "ia-b"], "interrupted"))
    while launcher._zygote is None or not launcher._ended:  # the requests are on their way
        await asyncio.sleep(0.01)
    start.cancel()  # Ctrl-C while the zygote imports
    with pytest.raises(asyncio.CancelledError):
        await start
    codes = await asyncio.wait_for(launcher.stop(), 60)
    assert set(codes) == {"ia-a", "ia-b"}  # the zygote forked both anyway, and both were stopped
    assert not any(_exists(p) for p in launcher._pids.values())
    assert launcher._zygote.returncode == 0

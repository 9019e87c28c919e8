"""scripts/launch_lan.sh with real node processes, all on loopback (nodes on 127.0.0.1, --ip 127.0.0.1,
static discovery: no mDNS at all): one node per host, stop and start again on the same port and id, a
failed start reported as one, --stop that signals only its own node, and the --hosts fan-out (a fake ssh
that runs the command here, as another host name) with a dead host. Every node a test starts has the
test's tmp_path in its command line (its --state-dir): the teardown stops them with the launcher, then
kills what is left."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "launch_lan.sh"
# starts fastest: no data file, no training, no mDNS registration (which takes 1.5-2 s)
NODE = ["--task", "synthetic", "--no-train", "--host", "127.0.0.1", "--discovery", "static"]
HOST_TIMEOUT = 15  # two nodes start in parallel within it (~4 s on an idle 2-core machine)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher reads /proc"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_pair() -> int:
    """A free port P whose next one, P + 1, is free too."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 90, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "--ip", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kw,
    )


def our_nodes(tmp_path: Path) -> list[int]:
    """Pids of the `gossipfl node` processes this test started (their command line names tmp_path)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node" in args and any(a.endswith(b"gossipfl") for a in args) and str(tmp_path).encode() in b" ".join(args):
            found.append(int(d.name))
    return found


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as r:
        return json.load(r)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not re.search(r"^State:\s*Z", Path(f"/proc/{pid}/status").read_text(), re.M)


@pytest.fixture(autouse=True)
def no_stray_nodes(tmp_path):
    yield
    for run_dir in tmp_path.glob("run*"):
        launch("--run-dir", str(run_dir), "--stop", timeout=60)
    for pid in our_nodes(tmp_path):
        os.kill(pid, signal.SIGKILL)


def test_a_second_start_on_a_host_is_refused_and_one_node_runs(tmp_path):
    """The first start logs at warning level, which hides the node's "node up at" line: the node's health
    check tells that it is up."""
    run, env = tmp_path / "run", {"LAUNCH_LAN_PORT": str(free_port())}
    first = launch("--run-dir", str(run), "--", *NODE, "--log-level", "warning", env=env)
    assert first.returncode == 0, first.stderr
    assert "node up at" not in next(run.glob("*/node.log")).read_text()
    again = launch("--run-dir", str(run), "--", *NODE, env=env)
    assert again.returncode != 0 and "already runs" in again.stderr and "--stop" in again.stderr
    elsewhere = launch("--run-dir", str(run), "--port", str(free_port()), "--", *NODE, env=env)  # another port, id
    assert elsewhere.returncode != 0 and "already runs" in elsewhere.stderr
    assert len(our_nodes(tmp_path)) == 1


def test_stop_then_start_comes_back_on_the_same_port_and_id_despite_time_wait(tmp_path):
    """The first start has no --port and its preferred port (LAUNCH_LAN_PORT, 8470 by default) is taken: it
    takes the next one. The second start prefers another one, yet comes back on the remembered port, which
    a connection that the node closed at stop holds in TIME_WAIT."""
    run, preferred, other_port = tmp_path / "run", free_pair(), free_port()
    first_port = preferred + 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", preferred))
        taken.listen()
        r = launch("--run-dir", str(run), "--", *NODE, env={"LAUNCH_LAN_PORT": str(preferred)})
    assert r.returncode == 0, r.stderr
    before = status(first_port)
    kept = http.client.HTTPConnection("127.0.0.1", first_port, timeout=5)  # open across the stop: the node closes it
    kept.request("GET", "/v1/status")
    kept.getresponse().read()
    stop = launch(f"--run-dir={run}", f"--port={first_port}", "--stop")  # the --opt=value form
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
    kept.close()
    if shutil.which("ss"):  # the premise: the port is in TIME_WAIT now
        ss = ["ss", "-Htan", "state", "time-wait", f"sport = :{first_port}"]
        assert subprocess.run(ss, capture_output=True, text=True).stdout.strip(), "no TIME_WAIT on the node's port"
    r = launch("--run-dir", str(run), "--", *NODE, env={"LAUNCH_LAN_PORT": str(other_port)})
    assert r.returncode == 0, r.stderr
    after = status(first_port)
    assert after["id"] == before["id"] and after["cluster"] == before["cluster"]
    assert re.fullmatch(r"lan-[0-9a-f]{8}", after["cluster"])


def test_a_failed_start_exits_nonzero_even_with_an_old_up_line_in_the_log(tmp_path):
    """A node that is up, then exits at once (a fake gossipfl), is a failed start; so is the next start of
    that node, with the real gossipfl and a bad option, although the log has the fake's up line."""
    run, port = tmp_path / "run", free_port()
    fake = tmp_path / "bin" / "gossipfl"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "node up at http://127.0.0.1:1/"\nsleep 0.3\necho "crashed" >&2\nexit 3\n')
    fake.chmod(0o755)
    crash = launch("--run-dir", str(run), "--port", str(port), "--gossipfl", str(fake))
    assert crash.returncode == 1 and "exited (code 3) right after it was up" in crash.stderr, crash.stderr
    assert "crashed" in crash.stderr
    (log,) = run.glob("*/node.log")
    assert "node up at" in log.read_text() and not (log.parent / "node.pid").exists()
    bad = launch("--run-dir", str(run), "--", *NODE, "--merge", "nope")  # the same node: its port, its id
    assert bad.returncode != 0
    assert "merge 'nope'" in bad.stderr and "right after" not in bad.stderr  # the tail of this start's log
    assert our_nodes(tmp_path) == [] and not (log.parent / "node.pid").exists()


def test_stop_signals_no_process_that_is_not_its_node(tmp_path):
    """A pid file naming a recycled pid (any process) or another node is removed, the process untouched."""
    run = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "gossipfl", "node", "--id", "other"])
    try:
        for name, proc in (("recycled", sleeper), ("mine", other)):
            (run / name).mkdir(parents=True)
            (run / name / "node.pid").write_text(f"{proc.pid}\n")
        # what is not a launcher option is a node option, which --stop refuses (before it looks at anything)
        refused = launch(f"--run-dir={run}", "--stop", "--merge=age")
        assert refused.returncode == 2 and "--stop takes no node options" in refused.stderr
        assert len(list(run.glob("*/node.pid"))) == 2
        r = launch("--run-dir", str(run), "--stop")
        assert r.returncode == 0
        assert sleeper.poll() is None and other.poll() is None
        assert "stale pid file" in r.stderr and not list(run.glob("*/node.pid"))
    finally:
        for proc in (sleeper, other):
            proc.kill()
            proc.wait()


def test_hosts_start_in_parallel_in_one_cluster_with_their_own_shards_past_a_dead_host(tmp_path):
    """Three hosts over a fake ssh that runs the command here, under the host's name (hostname), all in one
    shared run dir (an NFS home); the first one hangs. The other two are up long before its timeout, with
    shards 1/3 and 2/3 and the same fresh cluster; the commit of each is printed; the fan-out fails, within
    the host timeout. Started again, they say their node already runs; --hosts --stop stops them."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "hostname").write_text('#!/bin/sh\necho "$FAKE_HOST"\n')
    (fake_bin / "hostname").chmod(0o755)
    ssh = tmp_path / "ssh"
    ssh.write_text(
        "#!/usr/bin/env bash\n"
        '# [options] -n HOST COMMAND: runs COMMAND here, as HOST; host "dead" never answers\n'
        'host="${*: -2:1}" command="${*: -1}"\n'
        f'if [ "$host" = dead ]; then echo $$ >{tmp_path}/dead.pid; exec sleep 600; fi\n'
        f'FAKE_HOST="$host" PATH="{fake_bin}:$PATH" exec bash -c "$command"\n'
    )
    ssh.chmod(0o755)
    run = tmp_path / "run"
    hosts = ["--hosts", "dead,h1,h2", "--ssh", str(ssh), "--run-dir", str(run)]
    refused = launch(*hosts, "--partition", "1/3", "--", *NODE)
    assert refused.returncode != 0 and "--partition with --hosts" in refused.stderr
    refused = launch("--hosts=h1,h2", f"--ssh={ssh}", "--stop", "--", "--merge", "age")
    assert refused.returncode == 2 and "--stop takes no node options" in refused.stderr
    # each host uses its own checkout's run dir unless --run-dir is given (%h: the host's name)
    dry = launch("--hosts", "h1", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "scripts/launch_lan.sh" in dry.stdout and "--run-dir" not in dry.stdout
    dry = launch("--hosts", "h1", "--run-dir", str(tmp_path / "run-%h"), "--dry-run")
    assert f"--run-dir {tmp_path}/run-h1 " in dry.stdout

    t = time.monotonic()
    r = launch(*hosts, "--host-timeout", str(HOST_TIMEOUT), "--", *NODE, env={"LAUNCH_LAN_PORT": "0"})
    took = time.monotonic() - t
    assert r.returncode != 0 and HOST_TIMEOUT <= took < HOST_TIMEOUT + 10, (took, r.stdout, r.stderr)
    assert "[dead] FAILED" in r.stdout and "dead" in r.stderr
    # printed as each host finishes: the live hosts, listed after the dead one, were done before its timeout
    assert r.stdout.index("[h1] # commit") < r.stdout.index("[dead] FAILED") > r.stdout.index("[h2] # commit")
    assert not alive(int((tmp_path / "dead.pid").read_text()))

    commits = re.findall(r"^\[h[12]\] # commit (\S+)$", r.stdout, re.M)  # compared in full, printed short
    assert len(commits) == 2 and re.fullmatch("[0-9a-f]{12}", commits[0]), r.stdout
    assert f"commit {commits[0]} on 2 host(s)" in r.stdout
    seen = []
    for k, host in ((1, "h1"), (2, "h2")):
        env_file = next(run.glob(f"{host}-*/launch.env"))
        port = int(re.search(r"^port=(\d+)$", env_file.read_text(), re.M).group(1))
        s = status(port)
        assert s["partition"] == f"{k}/3"
        seen.append(s["cluster"])
    assert seen[0] == seen[1] and re.fullmatch(r"lan-[0-9a-f]{8}", seen[0]) and f"cluster {seen[0]}" in r.stdout
    assert (run / "cluster").read_text().strip() == seen[0]
    assert (run / ".launch.lock.h1").exists() and (run / ".launch.lock.h2").exists()  # one lock per host
    assert len(our_nodes(tmp_path)) == 2

    again = launch("--hosts", "h1,h2", "--ssh", str(ssh), "--run-dir", str(run), "--", *NODE)
    assert again.returncode == 2, (again.stdout, again.stderr)
    assert re.search(r"^\[h1\] already running: h1-\d+ \(pid \d+, port \d+\); not started$", again.stdout, re.M)
    assert "not started on h1 h2" in again.stderr and "--stop" in again.stderr and "--another" in again.stderr
    assert "FAILED" not in again.stdout

    stop = launch("--hosts=h1,h2", f"--ssh={ssh}", f"--run-dir={run}", "--stop")
    assert stop.returncode == 0 and "[h1] stopped h1-" in stop.stdout and "[h2] stopped h2-" in stop.stdout, stop
    assert our_nodes(tmp_path) == []

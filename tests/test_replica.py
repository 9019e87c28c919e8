"""``--partition auto/N`` under the Docker engine: the replica's name comes from a PTR query to the DNS
server of /etc/resolv.conf (Docker's embedded DNS answers ``<container name>.<network>``), because
/etc/hosts there maps the container's address to its id only. A resolver stub on loopback plays that
server; the end-to-end test runs a node process in namespaces of its own (no traffic leaves them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gossipfl.assembly import default_node_id
from gossipfl.discovery.replica import own_names, shard_index
from gossipfl.discovery.reverse import ptr_names

pytestmark = pytest.mark.timeout(120)

STUB = textwrap.dedent(
    """
    import socket, threading
    import dns.message, dns.rcode, dns.rrset

    def serve(sock, records, asked, silent=False):
        '''Answer PTR queries from ``records`` (reverse name -> target), NXDOMAIN otherwise.'''
        while True:
            try:
                wire, peer = sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text()
            asked.append(name)
            if silent:
                continue
            reply = dns.message.make_response(query)
            if name in records:
                reply.answer.append(dns.rrset.from_text(name, 600, "IN", "PTR", records[name]))
            else:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(reply.to_wire(), peer)
    """
)
exec(STUB)  # the same stub serves the in-process tests and runs inside the namespace of the end-to-end one


@contextmanager
def stub_server(records: dict[str, str], silent: bool = False) -> Iterator[tuple[int, list[str]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    asked: list[str] = []
    thread = threading.Thread(target=serve, args=(sock, records, asked, silent), daemon=True)  # noqa: F821
    thread.start()
    try:
        yield sock.getsockname()[1], asked
    finally:
        sock.close()


def _resolv_conf(tmp_path, *lines: str) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_ptr_query_goes_to_the_resolv_conf_server_and_returns_the_container_name(tmp_path):
    conf = _resolv_conf(tmp_path, "search example.internal", "nameserver 127.0.0.1", "options ndots:0")
    with stub_server({"5.0.18.172.in-addr.arpa.": "gossipfl-node-3.gossipfl_gossip."}) as (port, asked):
        assert ptr_names("172.18.0.5", resolv_conf=conf, port=port) == ["gossipfl-node-3.gossipfl_gossip"]
        assert ptr_names("172.18.0.6", resolv_conf=conf, port=port) == []  # NXDOMAIN
        assert asked == ["5.0.18.172.in-addr.arpa.", "6.0.18.172.in-addr.arpa."]
    names = ["3f2a9b0c1d2e", "3f2a9b0c1d2e", "gossipfl-node-3.gossipfl_gossip"]
    assert shard_index(names, 4) == (3, "gossipfl-node-3.gossipfl_gossip")
    assert default_node_id(8470, "gossipfl-node-3.gossipfl_gossip") == "gossipfl-node-3-8470"
    # a long project name is cut in the middle, never at the end where the ordinal is
    long = [default_node_id(8470, f"team-alice-federated-learning-experiment-2026-11-30-node-{i}") for i in (1, 2)]
    assert long[0] != long[1] and long[0].endswith("-node-1-8470") and all(len(i) <= 63 for i in long)


def test_no_server_no_answer_or_no_resolv_conf_gives_no_names_in_time(tmp_path):
    with stub_server({}, silent=True) as (port, asked):
        t0 = time.monotonic()
        assert ptr_names("172.18.0.5", resolv_conf=_resolv_conf(tmp_path, "nameserver 127.0.0.1"), port=port,
                         timeout=0.5) == []  # fmt: skip
        assert time.monotonic() - t0 < 2 and asked  # asked, then gave up after the timeout
    assert ptr_names("172.18.0.5", resolv_conf=str(tmp_path / "missing")) == []
    assert ptr_names("172.18.0.5", resolv_conf=_resolv_conf(tmp_path, "# no nameserver line")) == []


def test_own_names_asks_dns_only_when_no_local_name_carries_an_ordinal(monkeypatch):
    asked: list[str] = []

    def ptr(addr: str) -> list[str]:
        asked.append(addr)
        return ["gossipfl-node-2.gossipfl_gossip"]

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("172.18.0.7", 0))])
    monkeypatch.setattr(socket, "gethostbyaddr", lambda addr: ("3f2a9b0c1d2e", [], [addr]))
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9b0c1d2e")  # Docker: hostname and hosts = the id
    assert own_names(ptr) == ["3f2a9b0c1d2e", "3f2a9b0c1d2e", "gossipfl-node-2.gossipfl_gossip"]
    assert asked == ["172.18.0.7"]
    asked.clear()
    monkeypatch.setattr(socket, "gethostbyaddr", lambda addr: ("3f2a9b0c1d2e", ["gossipfl-node-2"], [addr]))
    assert own_names(ptr) == ["3f2a9b0c1d2e", "3f2a9b0c1d2e", "gossipfl-node-2"]  # podman: /etc/hosts has it
    assert asked == []
    # a reverse name that spells the address (a Kubernetes pod's, a cloud's) carries no ordinal
    monkeypatch.setattr(socket, "gethostbyaddr", lambda addr: ("3f2a9b0c1d2e", [], [addr]))
    spelled = ["172-18-0-7.default.pod.cluster.local", "ip-172-18-0-7.internal", "host-7-0-18-172.example"]
    assert own_names(lambda addr: spelled) == ["3f2a9b0c1d2e", "3f2a9b0c1d2e"]


DRIVER = STUB + textwrap.dedent(
    """
    import json, subprocess, sys, time, urllib.request
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.11", 53))  # where Docker's embedded DNS listens
    asked = []
    records = {"5.0.18.172.in-addr.arpa.": "gossipfl-node-3.gossipfl_gossip."}
    threading.Thread(target=serve, args=(sock, records, asked), daemon=True).start()
    state = sys.argv[1]
    node = subprocess.Popen([sys.executable, "-m", "gossipfl", "node", "--host", "172.18.0.5", "--port", "8470",
                             "--partition", "auto/4", "--discovery", "static", "--no-train",
                             "--state-dir", state], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = {}
    deadline = time.time() + 60
    while time.time() < deadline and node.poll() is None:
        try:
            with urllib.request.urlopen("http://172.18.0.5:8470/v1/status", timeout=2) as r:
                s = json.load(r)
            out = {"id": s["id"], "partition": s["partition"], "partition_from": s["partition_from"]}
            break
        except OSError:
            time.sleep(0.3)
    node.terminate()
    out["stderr"] = node.communicate(timeout=30)[1]
    out["rc"], out["asked"] = node.returncode, asked
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_docker_style_replica_takes_its_shard_and_id_from_the_embedded_dns(tmp_path):
    """As under the Docker engine: hostname and /etc/hosts give the container id only, /etc/resolv.conf names
    127.0.0.11, whose PTR answer for the container's address is <project>-<service>-<index>.<network>. The
    node trains shard 3 of 4 and is called gossipfl-node-3-8470, so a recreated container (new id, same
    name) finds its checkpoint directory again."""
    hosts, resolv, driver = tmp_path / "hosts", tmp_path / "resolv.conf", tmp_path / "driver.py"
    hosts.write_text("127.0.0.1 localhost\n172.18.0.5 3f2a9b0c1d2e\n")
    resolv.write_text("nameserver 127.0.0.11\noptions ndots:0\n")
    driver.write_text(DRIVER)
    script = (
        f"mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && ip link set lo up"
        " && ip link add eth0 type veth peer name eth1 && ip addr add 172.18.0.5/16 dev eth0"
        " && ip link set eth1 up && ip link set eth0 up"
        f" && hostname 3f2a9b0c1d2e && exec {sys.executable} {driver} {tmp_path / 'state'}"
    )
    r = subprocess.run(["unshare", "--mount", "--net", "--uts", "sh", "-c", script], capture_output=True,
                       text=True, timeout=110, cwd=os.getcwd())  # fmt: skip
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("namespaces not permitted here: " + r.stderr.strip())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["partition"] == "3/4", out
    assert out["partition_from"] == "gossipfl-node-3.gossipfl_gossip", out
    assert out["id"] == "gossipfl-node-3-8470", out
    assert out["asked"] == ["5.0.18.172.in-addr.arpa."], out
    assert out["rc"] == 0, out
    assert [d.name for d in (tmp_path / "state").iterdir()] == ["gossipfl-node-3-8470"]  # its state directory

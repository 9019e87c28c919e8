"""Discovery where multicast does not reach: DNS (A records of one name), static seeds plus peer exchange,
and `--partition auto/N` from the replica's ordinal. Everything on loopback or in a private network
namespace the test creates (no traffic leaves this machine)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gossipfl.config import ConfigError, NodeConfig
from gossipfl.discovery.dns import DnsDiscovery
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.pex import _base_url
from gossipfl.discovery.replica import ordinal_of, shard_index

from .helpers import running, wait_for

pytestmark = pytest.mark.timeout(120)


def test_replica_ordinals():
    assert ordinal_of("gossipfl-3") == 3
    assert ordinal_of("docker-node-12.docker_default") == 12
    assert ordinal_of("web_2") == 2
    assert ordinal_of("3f2a9b0c1d2e") is None and ordinal_of("node") is None
    # compose counts from 1, Kubernetes from 0: N consecutive replicas get N distinct shards either way
    assert sorted(shard_index([f"x-{i}"], 4)[0] for i in range(1, 5)) == [0, 1, 2, 3]
    assert sorted(shard_index([f"x-{i}"], 4)[0] for i in range(4)) == [0, 1, 2, 3]
    assert shard_index(["3f2a9b", "proj-node-2.net"], 4) == (2, "proj-node-2.net")
    assert shard_index(["abc"], 4) is None


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"discovery": ("dns",)}, "discovery dns needs --dns-name"),
        ({"dns_name": "not a name"}, "dns-name 'not a name'"),
        ({"dns_name": "-bad.example"}, "dns-name '-bad.example'"),
        ({"partition": "auto/0"}, "needs 0 <= K < N"),
        ({"partition": "any/4"}, "expected K/N (e.g. 0/8) or auto/N"),
        ({"pex_interval": 0}, "pex-interval must be > 0"),
    ],
)
def test_bad_discovery_configuration(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        NodeConfig(**kw)


async def test_dns_discovery_adds_every_address_and_follows_the_answer(make_config):
    """Three real nodes on 127.0.0.1-3, same port; a resolver stub plays the DNS server."""
    port = _free_port()
    configs = [make_config(host=f"127.0.0.{i}", port=port, id=f"dns-{i}") for i in (1, 2, 3)]
    async with running(*configs) as nodes:
        a = nodes[0]
        answer: list[str] | OSError = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

        async def resolve(name: str) -> list[str]:
            assert name == "gossipfl-nodes"
            if isinstance(answer, OSError):
                raise answer
            return list(answer)

        from gossipfl.discovery.probing import Prober

        prober = Prober(identity=a.identity, peers=a.peers, session_factory=lambda: a._session, log=a.log)
        log = logging.LoggerAdapter(logging.getLogger("test"), {})
        dns = DnsDiscovery("gossipfl-nodes", port, prober=prober, peers=a.peers, log=log, resolve=resolve)
        assert await dns.check() == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        await dns.round()
        assert {p.id: p.source for p in a.peers.all()} == {"dns-2": "dns", "dns-3": "dns"}  # itself skipped

        answer = ["127.0.0.1", "127.0.0.2"]  # a replica went away: its record is gone
        await dns.round()
        assert [p.id for p in a.peers.all()] == ["dns-2"]

        answer = OSError(-2, "Name or service not known")  # the name stops resolving: logged, kept, retried
        await dns.round()
        assert [p.id for p in a.peers.all()] == ["dns-2"]

        answer = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        await dns.round()
        assert sorted(p.id for p in a.peers.all()) == ["dns-2", "dns-3"]
        assert await wait_for(lambda: a.gossiper.stats.ok > 0, 10)  # and they gossip

        answer = []
        with pytest.raises(Exception, match=r"no IPv4 address\) after 1 s"):
            await dns.check(patience=0.6)


async def test_one_static_seed_reaches_the_whole_network_by_peer_exchange(make_config, http):
    """A chain of seeds (b and c know a, d knows b): peer exchange gives every node every other one."""
    fast = {"pex_interval": 0.3, "gossip_interval": 0.2}
    async with running(make_config(id="pex-a", **fast)) as (a,):
        seed_a = (f"127.0.0.1:{a.port}",)
        async with running(
            make_config(id="pex-b", seeds=seed_a, **fast), make_config(id="pex-c", seeds=seed_a, **fast)
        ) as (b, c):
            async with running(make_config(id="pex-d", seeds=(f"127.0.0.1:{b.port}",), **fast)) as (d,):
                nodes = [a, b, c, d]
                assert await wait_for(lambda: all(len(n.peers) == 3 for n in nodes), 30), [
                    (n.id, sorted(p.id for p in n.peers.all())) for n in nodes
                ]
                sources = {p.id: p.source for p in d.peers.all()}
                assert sources["pex-b"] == "static" and sources["pex-c"] in ("pex", "inbound")
                assert {p.source for p in a.peers.all()} <= {"pex", "inbound"}  # a was given no address at all
                async with http.get(d.url + "/v1/peers") as r:
                    listed = await r.json()
                assert listed["id"] == "pex-d"
                assert {p["id"] for p in listed["peers"]} == {"pex-a", "pex-b", "pex-c"}
                assert all({"url", "task", "source", "last_ok_s_ago"} <= p.keys() for p in listed["peers"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NAMESPACE_DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys, time, urllib.request
    py = sys.executable
    def status(ip):
        with urllib.request.urlopen(f"http://{ip}:8470/v1/status", timeout=2) as r:
            return json.load(r)
    def node(*args):
        return subprocess.Popen([py, "-m", "gossipfl", "node", "--discovery", "dns", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # a name that does not resolve yet is asked again; SIGTERM meanwhile stops the node at once, exit 0
    bad = node("--host", "127.0.0.1", "--port", "8470", "--dns-name", "nowhere-to-be-found")
    late = node("--host", "127.0.0.20", "--port", "8470", "--dns-name", "late-name")
    deadline = time.time() + 30
    while time.time() < deadline:  # until it listens: it has loaded its data and is looking the name up
        try:
            status("127.0.0.1")
            break
        except OSError:
            time.sleep(0.2)
    time.sleep(1)
    bad.terminate()
    t0 = time.time()
    bad_err = bad.communicate(timeout=20)[1]
    out = {"bad_rc": bad.returncode, "bad_err": bad_err.strip(), "bad_stop_s": time.time() - t0}
    with open("/etc/hosts", "a") as f:  # the record appears (a new pod's, in a headless Service)
        f.write("127.0.0.20 late-name\\n")
    deadline = time.time() + 20
    while time.time() < deadline and "pex" not in out.setdefault("late_loops", []):
        try:
            out["late_loops"] = sorted(status("127.0.0.20")["loops"])
        except OSError:
            pass
        time.sleep(0.3)
    late.terminate()
    out["late_err"], out["late_rc"] = late.communicate(timeout=20)[1].strip(), late.returncode
    procs = [subprocess.Popen([py, "-m", "gossipfl", "node", "--host", f"127.0.0.{i}", "--port", "8470",
                               "--id", f"ns-{i}", "--discovery", "dns", "--dns-name", "gossipfl-nodes",
                               "--dns-interval", "0.5", "--gossip-interval", "0.3", "--partition", "auto/3"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (11, 12, 13)]
    states = {}
    try:
        deadline = time.time() + 45
        while time.time() < deadline:
            try:
                states = {ip: status(ip) for ip in ("127.0.0.11", "127.0.0.12", "127.0.0.13")}
                if all(len(s["peers"]) == 2 and s["exchanges"]["ok"] >= 2 for s in states.values()):
                    break
            except OSError:
                pass
            time.sleep(0.3)
        out["states"] = {ip: {"peers": sorted((p["id"], p["source"]) for p in s["peers"]),
                              "ok": s["exchanges"]["ok"], "partition": s["partition"],
                              "partition_from": s["partition_from"]} for ip, s in states.items()}
    finally:
        for p in procs:
            p.terminate()
        out["exit"] = [p.wait(timeout=15) for p in procs]
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_dns_discovery_end_to_end_in_a_private_namespace(tmp_path):
    """Real processes, the system resolver, an /etc/hosts that gives one name three addresses (as a scaled
    compose service or a headless Service would), inside mount+network+UTS namespaces of this test's own;
    the hostname ends in -2, so --partition auto/3 gives shard 2. A node whose name has no record yet
    waits for it (and starts when it appears), and stops cleanly on SIGTERM while it waits."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.{i} gossipfl-nodes\n" for i in (11, 12, 13)))
    driver = tmp_path / "driver.py"
    driver.write_text(NAMESPACE_DRIVER)
    script = f"mount --bind {hosts} /etc/hosts && ip link set lo up && hostname gossipfl-2 && exec {sys.executable} "
    script += str(driver)
    r = subprocess.run(
        ["unshare", "--mount", "--net", "--uts", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=os.getcwd(),
    )
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("namespaces not permitted here: " + r.stderr.strip())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bad_rc"] == 0 and out["bad_stop_s"] < 5, out
    assert "dns-name nowhere-to-be-found does not resolve yet" in out["bad_err"], out
    assert "signal received during start-up" in out["bad_err"] and "Traceback" not in out["bad_err"], out
    assert "dns" in out["late_loops"] and out["late_rc"] == 0, out  # it started once its record appeared
    assert "dns-name late-name resolves now" in out["late_err"], out
    sources = set()
    for ip, state in out["states"].items():
        others = sorted(f"ns-{i}" for i in (11, 12, 13) if f"127.0.0.{i}" != ip)
        assert [peer for peer, _ in state["peers"]] == others and state["ok"] >= 2, out
        sources |= {source for _, source in state["peers"]}
        assert state["partition"] == "2/3" and state["partition_from"] == "gossipfl-2"
    # a node that DNS has not shown to a peer yet may be learned first when it calls that peer ("inbound")
    assert "dns" in sources and sources <= {"dns", "inbound"}, out
    assert out["exit"] == [0, 0, 0]


async def test_a_peer_that_calls_from_a_new_address_is_found_there(make_config):
    """b knows a at a stale address (as after a container got a new IP); a's next call gives b the right one."""
    async with running(make_config(id="moved-b", gossip_interval=1000)) as (b,):
        async with running(make_config(id="moved-a", seeds=(f"127.0.0.1:{b.port}",), gossip_interval=0.2)) as (a,):
            b.peers.upsert("moved-a", "http://127.0.0.1:1", "digits", "static")  # stale: nothing listens there
            assert await wait_for(lambda: b.peers.get("moved-a").url == a.url, 10)
            assert b.peers.get("moved-a").source == "static"  # still a seed: never forgotten


def test_peer_lists_only_yield_plain_base_urls():
    assert _base_url("http://10.0.0.1:8470") == "http://10.0.0.1:8470"
    assert _base_url("http://10.0.0.1:8470/") == "http://10.0.0.1:8470"
    for bad in ("http://10.0.0.1:8470/x", "http://u:p@h:1", "https://h:1", "http://h", "http://h:1?q", 7, "http://h:x"):
        assert _base_url(bad) is None, bad


async def test_peer_exchange_forgets_learned_peers_that_keep_failing_and_shares_only_working_ones(make_config, http):
    """A node's peer-exchange round drops peers learned by DNS, peer exchange or a call that failed five
    times in a row (seeds and mDNS peers stay), and its /v1/peers lists no failing peer, so a hung or dead
    peer is not spread to everyone."""
    async with running(make_config(gossip_interval=1000, pex_interval=0.1)) as (node,):
        for source in ("pex", "dns", "inbound", "static", "mdns"):
            node.peers.upsert(f"dead-{source}", "http://127.0.0.1:1", "digits", source)
        node.peers.upsert("fine", "http://127.0.0.1:2", "digits", "static")
        for source in ("pex", "dns", "inbound", "static", "mdns"):
            for _ in range(5):
                node.peers.mark_failed(f"dead-{source}")
        assert await wait_for(lambda: "dead-pex" not in node.peers, timeout=5)
        assert sorted(p.id for p in node.peers.all()) == ["dead-mdns", "dead-static", "fine"]
        async with http.get(node.url + "/v1/peers") as r:
            assert [p["id"] for p in (await r.json())["peers"]] == ["fine"]
        assert [p["id"] for p in node.status()["peers"]] == ["dead-mdns", "dead-static", "fine"]


async def test_a_seed_that_does_not_answer_is_a_warning_once(make_config, caplog):
    """Defect 10: unreachable or mistyped seeds logged nothing at the default level."""
    port = _free_port()
    with caplog.at_level(logging.INFO, logger="gossipfl"):
        async with running(make_config(seeds=(f"127.0.0.1:{port}",), gossip_interval=1000)) as (node,):
            node_loops = node.supervisor.loops
            assert await wait_for(lambda: node_loops["seeds"].rounds >= 1, timeout=10)
            async with running(make_config(port=port, gossip_interval=1000)) as (seed,):
                assert await wait_for(lambda: seed.id in node.peers, timeout=15)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, however many rounds it failed
    assert warnings[0].startswith(f"seed http://127.0.0.1:{port} does not answer (Cannot connect")
    assert warnings[0].endswith("); retrying")
    assert any(r.getMessage() == f"seed http://127.0.0.1:{port} answers now" for r in caplog.records)


async def test_a_seed_with_another_data_split_is_ignored_with_the_reason(make_config):
    """Defect 10: cluster-wide settings that must agree were neither advertised nor checked."""
    async with running(make_config(data_seed=7, gossip_interval=1000)) as (other,):
        async with running(make_config(seeds=(f"127.0.0.1:{other.port}",), gossip_interval=1000)) as (node,):
            assert await wait_for(lambda: node.status()["ignored_peers"], timeout=10)
            assert node.status()["ignored_peers"] == [
                {
                    "id": other.id,
                    "url": other.url,
                    "reason": "data split 7/1/iid (data-seed/shards/scheme), ours 2026/1/iid",
                }
            ]
            assert len(node.peers) == 0


def test_mdns_stays_on_the_interface_of_the_address_a_node_binds():
    from gossipfl.discovery.mdns import mdns_interfaces

    assert mdns_interfaces("127.0.0.1", ()) == ("127.0.0.1",)  # used to announce 127.0.0.1 everywhere
    assert mdns_interfaces("0.0.0.0", ()) == ()  # all interfaces
    assert mdns_interfaces("127.0.0.1", ("10.0.0.5",)) == ("10.0.0.5",)  # what the user said wins


async def test_a_node_bound_to_loopback_runs_mdns_on_loopback_only(make_config, monkeypatch):
    import gossipfl.discovery.service

    used = []
    service = gossipfl.discovery.service
    real = service.make_zeroconf
    monkeypatch.setattr(service, "make_zeroconf", lambda interfaces: used.append(interfaces) or real(interfaces))
    async with running(make_config(discovery=("mdns",), mdns_interface=(), gossip_interval=1000)) as (node,):
        assert used == [("127.0.0.1",)]
        assert [str(a) for a in node.discovery.mdns.info.parsed_addresses()] == ["127.0.0.1"]


async def test_inbound_callers_are_probed_once_each_at_most_16_at_once_and_not_after_close():
    import asyncio
    import logging

    from gossipfl.discovery.identity import Identity
    from gossipfl.discovery.service import MAX_INBOUND_PROBES, Discovery, DiscoverySettings

    settings = DiscoverySettings(("static",), "127.0.0.1", (), (), None, 5.0, 5.0, 0)
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    d = Discovery(
        settings, node_id="me", port=1, identity=Identity("t", "m"), peers=PeerTable("me"),
        session_factory=lambda: None, log=log,
    )  # fmt: skip
    release = asyncio.Event()
    probed: list[str] = []

    async def probe(url: str, source: str) -> str:
        probed.append(url)
        await release.wait()
        return "added"

    d.prober.probe = probe  # type: ignore[method-assign]
    for i in range(MAX_INBOUND_PROBES + 4):
        d.learn_inbound(f"http://10.0.0.{i}:1")
        d.learn_inbound(f"http://10.0.0.{i}:1")  # asked again while its probe runs: not twice
    await asyncio.sleep(0)
    assert len(probed) == MAX_INBOUND_PROBES == len(set(probed)) and len(d.tasks) == MAX_INBOUND_PROBES
    release.set()
    await asyncio.gather(*d.tasks)
    assert d.tasks == []
    d.learn_inbound("http://10.0.0.1:1")  # room again: probed again
    await asyncio.sleep(0)
    assert probed.count("http://10.0.0.1:1") == 2
    d.close()
    d.learn_inbound("http://10.0.0.99:1")
    await asyncio.sleep(0)
    assert "http://10.0.0.99:1" not in probed
    await asyncio.gather(*d.tasks)
    await d.stop()  # never started: nothing to release


async def test_a_node_that_cannot_start_leaves_nothing_running(make_config, monkeypatch):
    import asyncio

    from gossipfl.discovery.dns import DnsError
    from gossipfl.discovery.service import DnsDiscovery
    from gossipfl.node import Node, StartError

    async def fail(self: object) -> list[str]:
        raise DnsError("name 'nodes.example' does not resolve")  # no query leaves this machine

    monkeypatch.setattr(DnsDiscovery, "check", fail)
    before = set(asyncio.all_tasks())
    node = Node(make_config(discovery=("static", "dns"), dns_name="nodes.example", seeds=("127.0.0.1:9",)))
    with pytest.raises(StartError, match="does not resolve"):
        await node.start()
    await asyncio.sleep(0.1)
    assert set(asyncio.all_tasks()) - before == set()  # the seeds loop did not start (it used to, then ran on)


def test_the_secure_compose_override_names_the_secret_files():
    import yaml

    doc = yaml.safe_load((Path(__file__).parent.parent / "docker" / "compose.secure.yaml").read_text())
    env = doc["services"]["node"]["environment"]
    mounted = {f"/run/secrets/{name}" for name in doc["services"]["node"]["secrets"]}
    assert {env["GOSSIPFL_SECRET_FILE"], env["GOSSIPFL_READ_TOKEN_FILE"]} == mounted
    assert set(doc["secrets"]) == set(doc["services"]["node"]["secrets"])

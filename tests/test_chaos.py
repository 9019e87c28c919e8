"""The chaos testbed (gossipfl/testbed/netns.py) with real node processes, each on a host of its own (a
Linux network namespace) on one bridge, finding each other over real mDNS multicast: a partition of the
bridge and its heal, lossy links, a node killed with SIGKILL and restarted. Pure averaging (--no-train):
what the nodes hold is then fully predictable (each side of a partition keeps its own mean). Needs root,
``ip`` and ``tc``; skipped otherwise."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from gossipfl.learning.learner import build_seeded, gossiped_tensors
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.protocol import wire
from gossipfl.protocol.consensus import flatten
from gossipfl.testbed.netns import NetnsError, Network, missing_requirements

from .faults import exchanges_done, quiet

WHY_NOT = missing_requirements()
pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=f"chaos testbed: {WHY_NOT}"),
    pytest.mark.timeout(120),
]
GI = 0.5  # gossip interval of these tests' nodes


def initial_state(seed: int) -> dict[str, np.ndarray]:
    model = build_seeded(DigitsTask().build_model, seed)
    return {k: v.detach().numpy().copy() for k, v in gossiped_tensors(model).items()}


SPEC = wire.spec_of(initial_state(0))


@pytest.fixture
def network(tmp_path):
    """A factory: ``network(n)`` builds n hosts and starts a pure-averaging node on each (seed i)."""
    made: list[Network] = []

    def build(n: int) -> Network:
        net = Network(n, tmp_path / f"logs{len(made)}")
        made.append(net)
        try:
            net.create()
        except NetnsError as e:
            if "Operation not permitted" in str(e):
                pytest.skip(f"network namespaces not permitted here: {e}")
            raise
        for i in range(n):
            net.start(i, ["--no-train", "--cluster", "chaos", "--seed", str(i), "--gossip-interval", str(GI)])
        net.wait_ready(timeout=90)
        return net

    yield build
    for net in made:
        net.destroy()


def models(net: Network) -> list[np.ndarray]:
    return [flatten(wire.decode(b, SPEC).params) for b in net.models()]


def consistent_models(net: Network, timeout: float = 20.0) -> list[np.ndarray]:
    """The models at a moment when nothing was in flight, prepared or in doubt, and nothing merged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = net.statuses()
        if all(s is not None and quiet(s) for s in before):
            vs = models(net)
            after = net.statuses()
            if all(s is not None and quiet(s) for s in after) and [s["merges"] for s in before] == [
                s["merges"] for s in after
            ]:
                return vs
        time.sleep(0.05)
    raise TimeoutError("no quiet moment")


def last_ok(status: dict, peer_id: str, now: float) -> float | None:
    """When (our clock) the node last committed an exchange it started with ``peer_id``."""
    row = next(p for p in status["peers"] if p["id"] == peer_id)
    return None if row["last_ok_s_ago"] is None else now - row["last_ok_s_ago"]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


def test_nodes_on_hosts_of_their_own_find_each_other_over_multicast_and_exchange(network):
    net = network(3)
    addrs = {h.node_id: h.url for h in net.hosts}
    assert len(set(addrs.values())) == 3 and not any("127.0.0.1" in a for a in addrs.values())
    for h, st in zip(net.hosts, net.statuses(), strict=True):
        assert st["id"] == h.node_id
        assert {(p["id"], p["url"], p["source"]) for p in st["peers"]} == {
            (i, url, "mdns") for i, url in addrs.items() if i != h.node_id
        }
    wait_for(lambda: all(s["exchanges"]["ok"] >= 3 for s in net.statuses()), 20, "3 exchanges per node")


def test_a_partition_keeps_exchanges_on_each_side_and_the_heal_merges_the_sides(network):
    """Two hosts a side. While split, no exchange crosses (the tries fail), each side averages to its own
    mean and keeps it; once healed, the sides exchange again and the two means become one."""
    net = network(4)
    sides = [[0, 1], [2, 3]]
    other = {i: {f"n{j}" for j in sides[1 - k]} for k, side in enumerate(sides) for i in side}
    failed0 = [s["exchanges"]["failed"] for s in net.statuses()]
    net.partition(sides)
    t_split = time.monotonic()
    assert [net.bridge_of(i) for i in range(4)] == ["br0", "br0", "br1", "br1"]
    time.sleep(4.0)
    first = models(net)
    time.sleep(2.0)
    second = models(net)
    now = time.monotonic()  # before the reads: a slow read then errs toward "earlier", never past t_split
    sts = net.statuses()
    for i, st in enumerate(sts):
        assert all((last_ok(st, p, now) or 0) < t_split + 0.3 for p in other[i]), (i, st["peers"])
        (mate,) = [f"n{j}" for j in sides[i // 2] if j != i]
        assert last_ok(st, mate, now) > t_split, (i, st["peers"])  # its side went on exchanging
        assert st["exchanges"]["failed"] > failed0[i], i  # it tried the other side, and that failed
    mean = [[np.mean([vs[i] for i in side], axis=0) for side in sides] for vs in (first, second)]
    gap = np.linalg.norm(mean[1][0] - mean[1][1])
    assert gap > 1e-4, gap
    for k in range(2):  # each side keeps its own mean and agrees within itself
        assert np.linalg.norm(mean[1][k] - mean[0][k]) < 1e-3 * gap
        assert np.linalg.norm(second[sides[k][0]] - second[sides[k][1]]) < 1e-3 * gap

    net.heal()
    t_heal = time.monotonic()
    assert {net.bridge_of(i) for i in range(4)} == {"br0"}

    def merged() -> bool:
        vs = models(net)
        return np.linalg.norm(np.mean(vs[:2], axis=0) - np.mean(vs[2:], axis=0)) < 1e-3 * gap

    wait_for(merged, 30, "the two sides' means meet")
    now = time.monotonic()
    crossed = [any((last_ok(st, p, now) or 0) > t_heal for p in other[i]) for i, st in enumerate(net.statuses())]
    assert any(crossed), crossed


def test_a_lossy_link_fails_exchanges_but_no_node_errs_stalls_or_loses_the_mean(network):
    """A third of the packets to and from one host lost for 10 s (TCP retransmits most; some exchanges
    with it fail): the others go on exchanging among themselves, no loop errs and no request fails with
    an error, and once the loss ends every node commits exchanges again, nothing stays in doubt, and the
    network mean is what it was at the start (no exchange applied on one side only)."""
    net = network(4)
    if not net.netem and shutil.which("nft") is None:
        pytest.skip("lossy links need tc netem or nftables (nft)")
    before = net.statuses()
    net.impair(3, loss=0.33)
    time.sleep(10.0)
    during = net.statuses(timeout=5.0)
    net.clear(3)
    assert sum(d["exchanges"]["failed"] - b["exchanges"]["failed"] for b, d in zip(before, during, strict=True)) > 0
    for b, d in zip(before[:3], during[:3], strict=True):
        assert exchanges_done(d) > exchanges_done(b), d["exchanges"]  # not held up by the lossy one
    after = net.statuses()

    def all_going_on() -> bool:  # a node backs off from a failing peer, for up to 30 s
        now = net.statuses()
        return all(
            s is not None and exchanges_done(s) > exchanges_done(a) and s["exchanges"]["doubtful"] == 0
            for a, s in zip(after, now, strict=True)
        )

    wait_for(all_going_on, 40, "every node commits exchanges again, none in doubt")
    for s in net.statuses():
        assert s["failure"] is None and s["exchanges"]["rejected"] == 0
        assert all(loop["errors"] == 0 for loop in s["loops"].values()), s["loops"]
    mean0 = np.mean([flatten(initial_state(i)) for i in range(4)], axis=0)
    drift = np.linalg.norm(np.mean(consistent_models(net), axis=0) - mean0) / np.linalg.norm(mean0)
    assert drift < 1e-5, drift
    logs = "".join(p.read_text() for p in Path(net.logs).glob("*.log"))
    assert "Traceback" not in logs and "Error handling request" not in logs


def test_a_killed_node_comes_back_with_its_id_and_the_others_keep_going(network):
    net = network(4)
    pid = net.hosts[3].proc.pid
    net.kill(3)
    t_kill = time.monotonic()
    before = net.statuses([0, 1, 2])
    time.sleep(4.0)
    during = net.statuses()
    assert during[3] is None and not net.running(3)
    for b, d in zip(before, during[:3], strict=True):
        assert d["exchanges"]["ok"] > b["exchanges"]["ok"]  # the survivors exchange among themselves
    net.restart(3)
    assert net.hosts[3].proc.pid != pid and net.hosts[3].starts == 2
    net.wait_ready(hosts=[3], timeout=60)
    st = net.statuses([3])[0]
    assert st["id"] == "n3" and st["url"] == net.hosts[3].url
    t_back = time.monotonic()
    wait_for(lambda: net.statuses([3])[0]["exchanges"]["ok"] >= 2, 20, "the restarted node exchanges")

    def survivors_reach_it() -> bool:
        now = time.monotonic()
        return any((last_ok(s, "n3", now) or 0) > t_back for s in net.statuses([0, 1, 2]))

    wait_for(survivors_reach_it, 30, "a survivor commits an exchange it started with the restarted node")
    assert t_back > t_kill

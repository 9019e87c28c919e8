"""Failure handling left over from deployment: a name that does not resolve yet at start (a new pod's
record), a replica whose own name comes late (auto/N), and an inbound caller that cannot be reached back
at its source address (behind NAT): remembered for a minute instead of probed on every call."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gossipfl import assembly
from gossipfl.discovery import service
from gossipfl.discovery.dns import DnsDiscovery, DnsError
from gossipfl.protocol import wire

from .faults import free_port
from .helpers import running, wait_for

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


class Answers:
    """A resolver (or a names function) that fails ``failures`` times, then answers."""

    def __init__(self, failures: int, answer: list[str]) -> None:
        self.failures, self.answer, self.calls = failures, answer, 0

    async def resolve(self, name: str) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(-2, "Name or service not known")
        return self.answer

    def names(self) -> list[str]:
        self.calls += 1
        return ["3f2a9b0c"] if self.calls <= self.failures else ["3f2a9b0c", "gossipfl-node-3"]


async def test_a_name_that_resolves_after_a_while_is_waited_for(caplog):
    answers = Answers(2, ["10.1.2.3"])
    dns = DnsDiscovery("late", 8470, prober=None, peers=None, log=LOG, resolve=answers.resolve)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        assert await dns.check(patience=10) == ["10.1.2.3"]
    assert answers.calls == 3
    text = caplog.text
    assert text.count("does not resolve yet") == 1 and "resolves now" in text


async def test_a_name_that_never_resolves_is_an_error_after_the_patience():
    answers = Answers(10**6, [])
    dns = DnsDiscovery("never", 8470, prober=None, peers=None, log=LOG, resolve=answers.resolve)  # type: ignore[arg-type]
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(DnsError, match=r"'never' does not resolve \(Name or service not known\) after 1 s"):
        await dns.check(patience=1.0)
    assert 0.9 < asyncio.get_running_loop().time() - t0 < 3 and answers.calls >= 2


async def test_auto_partition_waits_for_the_replica_name(caplog):
    answers = Answers(2, [])
    with caplog.at_level(logging.WARNING):
        k, n, source = await assembly.resolve_shard((None, 4), LOG, patience=10, names_of=answers.names)
    assert (k, n, source) == (3, 4, "gossipfl-node-3") and answers.calls == 3
    assert caplog.text.count("no replica ordinal") == 1
    with pytest.raises(ValueError, match=r"no replica ordinal in this host's names \(3f2a9b0c\) after 1 s"):
        await assembly.resolve_shard((None, 4), None, patience=0.6, names_of=Answers(10**6, []).names)


async def test_an_unreachable_inbound_caller_is_probed_once_a_minute(make_config, http):
    """A caller whose address cannot be reached back (its announced port answers nothing, as behind NAT) is
    answered every time, probed once, then remembered as unreachable for UNREACHABLE_S."""
    async with running(make_config(no_train=True)) as (n,):
        probes: list[str] = []
        real = n.discovery.prober.probe

        async def counting(url: str, source: str, claimed: str | None = None) -> str:
            probes.append(url)
            return await real(url, source, claimed)

        n.discovery.prober.probe = counting  # type: ignore[method-assign]
        now = [1000.0]
        n.discovery.clock = lambda: now[0]
        dead_port = free_port()
        url = f"http://127.0.0.1:{dead_port}"

        async def call() -> int:
            state = n.learner.snapshot()
            msg = wire.GossipMessage("behind-nat", 0, state.params, n.task.name, port=dead_port, xid=wire.new_xid())
            async with http.post(n.url + "/v1/gossip", data=wire.encode(msg).tobytes()) as r:
                await r.read()
            async with http.post(f"{n.url}/v1/gossip/{msg.xid}/abort") as done:  # frees its slot
                assert done.status == 200
            return r.status

        assert await call() == 200
        assert await wait_for(lambda: url in n.discovery.unreachable, 10)
        for _ in range(3):
            assert await call() == 200  # answered, not probed
        await asyncio.sleep(0.3)
        assert probes == [url]
        now[0] += service.UNREACHABLE_S + 1  # a minute later it is tried again
        assert await call() == 200
        assert await wait_for(lambda: probes == [url, url], 10), probes

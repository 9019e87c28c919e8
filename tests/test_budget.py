"""The upload budget (--max-upload-rate): the rate arithmetic, and two real nodes that keep to it."""

from __future__ import annotations

import asyncio

import pytest

from gossipfl.common.units import parse_rate
from gossipfl.protocol.budget import UploadBudget
from tests.helpers import message, running, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_message_puts_the_node_in_debt_for_its_size_over_the_rate():
    clock = Clock()
    b = UploadBudget(1000.0, clock)
    assert b.wait() == 0
    b.spend(500)
    assert b.wait() == pytest.approx(0.5)
    b.spend(1500)  # sent while in debt (a reply already under way): the debts add up
    assert b.wait() == pytest.approx(2.0)
    clock.now += 1.5
    assert b.wait() == pytest.approx(0.5)
    clock.now += 10
    assert b.wait() == 0
    b.spend(1000)  # idle time is not saved up: a burst after a pause still waits its own size
    assert b.wait() == pytest.approx(1.0)


def test_the_measured_rate_covers_the_last_ten_seconds_budget_or_not():
    clock = Clock()
    b = UploadBudget(None, clock)
    clock.now += 2
    b.spend(4000)
    assert b.wait() == 0 and b.measured() == pytest.approx(2000)  # over the 2 s since the start
    clock.now += 8
    b.spend(6000)
    assert b.measured() == pytest.approx(1000)  # 10,000 bytes over 10 s
    clock.now += 9
    assert b.measured() == pytest.approx(600)  # the first message left the window
    assert b.total == 10_000


async def upload_over(make_config, seconds: float, rate: str | None) -> tuple[int, int, int]:
    """Two nodes on a 1 MB model gossiping as fast as they may for ``seconds``: (bytes each sent, the size of
    one message)."""
    common = dict(task="synthetic:mb=1", no_train=True, gossip_interval=0.02, join_wait=0, max_upload_rate=rate)
    async with running(make_config(seed=1, **common)) as (a,):
        async with running(make_config(seed=2, seeds=(f"127.0.0.1:{a.port}",), **common)) as (b,):
            assert await wait_for(lambda: a.id in b.peers and b.id in a.peers, timeout=10)
            start = [n.gossiper.stats.bytes_sent for n in (a, b)]
            await asyncio.sleep(seconds)
            sent = [n.gossiper.stats.bytes_sent - s for n, s in zip((a, b), start, strict=True)]
            status = a.status()["upload"]
            assert status["max_bytes_per_s"] == (None if rate is None else 250_000.0)
            assert status["rate_bytes_per_s"] > 0
            text = a.metrics.exposition(None)[0].decode()
            gauges = {  # name{labels} value
                line.split("{")[0].split()[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("gossipfl_upload_")
            }
            assert gauges["gossipfl_upload_rate_bytes_per_second"] > 0
            assert gauges.get("gossipfl_upload_budget_bytes_per_second") == status["max_bytes_per_s"]
            return sent[0], sent[1], a.gossiper.max_body


async def test_two_nodes_keep_their_upload_under_the_budget(make_config):
    seconds = 6.0
    a, b, message = await upload_over(make_config, seconds, "250kB/s")
    for sent in (a, b):  # at most the budget's worth, plus the one message that may go out in debt
        assert 0 < sent <= 250_000 * seconds + message, sent
    free_a, free_b, _ = await upload_over(make_config, 2.0, None)  # the same nodes without a budget
    assert min(free_a, free_b) > 3 * 250_000 * 2.0


async def test_a_node_over_its_budget_answers_prepares_with_409_until_it_is_paid(make_config, http):
    """A responder's replies count against its budget too: one reply of a digits model (~20 kB) at 10 kB/s
    keeps it busy for about two seconds, during which every prepare is declined without a reply."""
    async with running(make_config(no_train=True, gossip_interval=1000, max_upload_rate="10kB/s")) as (node,):
        url = node.url + "/v1/gossip"
        async with http.post(url, data=message(node), headers={"Content-Type": "application/msgpack"}) as r:
            assert r.status == 200
            reply = await r.read()
        assert node.gossiper.upload.wait() == pytest.approx(len(reply) / 10_000, abs=0.3)
        async with http.post(url, data=message(node), headers={"Content-Type": "application/msgpack"}) as r:
            assert r.status == 409 and "busy: over its upload budget" in (await r.json())["error"]
        assert node.gossiper.stats.bytes_sent == len(reply)  # nothing more went out
        assert await wait_for(lambda: node.gossiper.upload.wait() == 0, timeout=5)
        async with http.post(url, data=message(node), headers={"Content-Type": "application/msgpack"}) as r:
            assert r.status == 200


@pytest.mark.parametrize(
    ("text", "rate"),
    [("1e6", 1e6), ("500k", 5e5), ("10MB/s", 1e7), ("1.5 MiB/s", 1.5 * 2**20), ("100Mbit/s", 1.25e7), ("8Mbps", 1e6)],
)
def test_rates_read_in_human_units(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["0", "-5MB/s", "0.5", "1e-320", "1e999", "fast", "10 XB", "MiB/s", ""])
def test_a_rate_that_is_not_one_byte_per_second_or_more_is_refused(text):
    with pytest.raises(ValueError, match="not a rate|at least 1"):
        parse_rate(text)

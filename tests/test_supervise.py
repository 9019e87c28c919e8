"""Supervised background loops: errors are counted, logged once per kind, and fatal only when a loop
cannot go on."""

import asyncio
import logging

import pytest

from gossipfl.common.supervise import Supervisor, error_kind

pytestmark = pytest.mark.timeout(30)


def supervisor(max_consecutive=3):
    fatal: list[str] = []
    log = logging.LoggerAdapter(logging.getLogger("gossipfl.test"), {"node": "t"})
    return Supervisor(log, on_fatal=fatal.append, max_consecutive=max_consecutive), fatal


async def test_a_failing_round_is_counted_and_the_loop_goes_on(caplog):
    sup, fatal = supervisor()
    stop = asyncio.Event()
    calls = []

    def work():
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ValueError(f"bad round {len(calls)}")
        if len(calls) >= 25:
            stop.set()

    with caplog.at_level(logging.DEBUG, logger="gossipfl.test"):
        await sup.loop("train", 0.001, stop, work)
    h = sup.loops["train"]
    assert (h.rounds, h.errors, h.consecutive) == (13, 12, 0) and not h.running
    assert fatal == [] and sup.fatal is None
    assert h.last_error.startswith("ValueError at test_supervise.py:") and "bad round 24" in h.last_error
    levels = [r.levelno for r in caplog.records]
    assert levels.count(logging.ERROR) == 1 and levels.count(logging.WARNING) == 1  # first, and the 10th
    assert caplog.records[0].exc_info is not None  # the first has its traceback
    d = sup.describe()["train"]
    assert d["errors"] == 12 and d["rounds"] == 13 and d["last_error_s_ago"] >= 0


async def test_consecutive_failures_are_fatal_once():
    sup, fatal = supervisor(max_consecutive=3)
    stop = asyncio.Event()

    async def work():
        raise OSError("disk gone")

    await sup.loop("eval", 0.001, stop, work)  # returns by itself: the loop cannot go on
    assert len(fatal) == 1 and fatal[0].startswith("eval failed 3 times in a row, last: OSError")
    assert sup.fatal == fatal[0]
    sup.error("eval", OSError("again"))
    assert len(fatal) == 1


async def test_a_loop_waits_first_when_asked_and_stops_when_told():
    sup, _ = supervisor()
    stop = asyncio.Event()
    calls = []
    stop.set()
    await sup.loop("gossip", lambda: 0.01, stop, lambda: calls.append(1), first_wait=True)
    assert calls == []


async def test_a_watched_task_that_dies_is_fatal_unless_stopping_or_cancelled():
    sup, fatal = supervisor()
    stop = asyncio.Event()

    async def boom():
        raise KeyError("bug")

    task = asyncio.ensure_future(boom())
    sup.watch(task, "pex", stop)
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert fatal and fatal[0].startswith("pex ended: KeyError")
    sup2, fatal2 = supervisor()
    cancelled = asyncio.ensure_future(asyncio.sleep(10))
    sup2.watch(cancelled, "seeds", stop)
    cancelled.cancel()
    stop.set()
    late = asyncio.ensure_future(boom())
    sup2.watch(late, "dns", stop)
    await asyncio.gather(cancelled, late, return_exceptions=True)
    await asyncio.sleep(0)
    assert fatal2 == []


def test_error_kind_names_the_type_and_the_raising_line():
    try:
        {}["x"]
    except KeyError as e:
        kind = error_kind(e)
    assert kind.startswith("KeyError at test_supervise.py:")
    assert error_kind(ValueError("never raised")) == "ValueError"


def test_errors_outside_a_round_are_counted_but_never_fatal():
    sup, fatal = supervisor(max_consecutive=2)
    for _ in range(5):
        sup.error("gossip", RuntimeError("an exchange task failed"), in_a_round=False)
    h = sup.loops["gossip"]
    assert h.errors == 5 and h.consecutive == 0 and fatal == []

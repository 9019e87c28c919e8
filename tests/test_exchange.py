"""The bookkeeping of two-phase exchanges, alone: a responder's ledger and an initiator's doubts."""

import pytest

from gossipfl.protocol.ledger import ABORTED, COMMITTED, DoubtBook, InDoubt, Ledger


def ledger(**kw):
    return Ledger(max_prepared=kw.pop("max_prepared", 2), prepare_ttl=kw.pop("prepare_ttl", 5.0), **kw)


def test_the_first_decision_wins_and_is_remembered():
    led = ledger()
    led.prepare("x1", "a", "state", "merged", now=0.0)
    assert led.prepared("x1").expires == 5.0 and len(led) == 1
    entry = led.decide("x1", COMMITTED, now=1.0)
    assert entry.merged == "merged" and led.prepared("x1") is None and len(led) == 0
    assert led.decide("x1", ABORTED, now=2.0) is None
    assert led.outcome("x1") == COMMITTED  # a later decision changes nothing
    with pytest.raises(ValueError, match="already known"):
        led.prepare("x1", "a", "state", "merged", now=3.0)  # a decided xid cannot be prepared again
    with pytest.raises(ValueError, match="unknown outcome"):
        led.decide("x2", "maybe", now=0.0)


def test_an_unknown_exchange_can_be_aborted_before_it_is_prepared():
    led = ledger()
    assert led.decide("late", ABORTED, now=0.0) is None
    assert led.outcome("late") == ABORTED
    with pytest.raises(ValueError):
        led.prepare("late", "a", "s", "m", now=0.5)


def test_prepared_exchanges_expire_into_aborted_and_outcomes_are_forgotten_later():
    led = ledger(remember_s=100.0)
    led.prepare("old", "a", "s", "m", now=0.0)
    led.prepare("new", "b", "s", "m", now=4.0)
    assert [p.xid for p in led.expire(now=5.0)] == ["old"]
    assert led.outcome("old") == ABORTED and led.prepared("new") is not None
    led.expire(now=99.9)
    assert led.outcome("old") == ABORTED
    led.expire(now=105.1)
    assert led.outcome("old") is None  # remembered for remember_s, then forgotten
    assert led.outcome("new") == ABORTED  # it expired (when expire() ran at 99.9): remembered until 199.9


def test_room_counts_prepared_and_reserved_exchanges():
    led = ledger(max_prepared=2)
    assert led.room() and led.room(reserved=1) and not led.room(reserved=2)
    led.prepare("x", "a", "s", "m", now=0.0)
    assert led.room() and not led.room(reserved=1)


def test_remembered_outcomes_are_bounded():
    led = ledger(max_remembered=3)
    for i in range(5):
        led.decide(f"x{i}", ABORTED, now=float(i))
    assert [led.outcome(f"x{i}") for i in range(5)] == [None, None, ABORTED, ABORTED, ABORTED]


def test_doubts_are_retried_with_backoff_then_given_up():
    book = DoubtBook(give_up_s=60.0, retry_base=1.0, retry_max=4.0)
    book.add(InDoubt("x", "peer", "http://p:1", "sent", "merged", since=0.0), now=0.0)
    assert book.peers() == {"peer"} and book.due(0.5) == [] and [e.xid for e in book.due(1.0)] == ["x"]
    delays = []
    now = 1.0
    for _ in range(4):
        book.retry_later("x", now)
        delays.append(book.due(1e9)[0].next_try - now)
    assert delays == [2.0, 4.0, 4.0, 4.0]
    assert book.expire(59.0) == [] and len(book) == 1
    assert [e.xid for e in book.expire(60.0)] == ["x"] and len(book) == 0
    book.add(InDoubt("y", "peer", "u", "s", "m", since=0.0), now=0.0)
    assert book.resolve("y").xid == "y" and book.resolve("y") is None


def test_a_flood_of_unknown_ids_cannot_evict_the_outcome_of_a_real_exchange():
    """Review finding: 65,546 unauthenticated aborts of random ids evicted a committed outcome, and the
    initiator asking about it was then told "aborted"."""
    led = ledger(max_remembered=3)
    led.prepare("real", "a", "s", "m", now=0.0)
    led.decide("real", COMMITTED, now=0.0)
    for i in range(100):
        led.decide(f"noise{i}", ABORTED, now=1.0)
    assert led.outcome("real") == COMMITTED
    assert led.outcome("noise99") == ABORTED and led.outcome("noise0") is None  # the noise is bounded
    with pytest.raises(ValueError, match="never prepared"):
        led.decide("never", COMMITTED, now=0.0)


def test_doubts_are_bounded_and_the_oldest_is_given_up():
    book = DoubtBook(max_entries=2)
    assert book.add(InDoubt("x1", "p1", "u", "s", "m", since=0.0), now=0.0) == []
    assert book.add(InDoubt("x2", "p2", "u", "s", "m", since=1.0), now=1.0) == []
    assert [e.xid for e in book.add(InDoubt("x3", "p3", "u", "s", "m", since=2.0), now=2.0)] == ["x1"]
    assert book.peers() == {"p2", "p3"}
    assert book.fresh(now=3.5, within=2.0) and not book.fresh(now=4.0, within=2.0)


def test_retries_double_until_the_cap():
    book = DoubtBook(retry_base=1.0, retry_max=100.0)
    book.add(InDoubt("x", "p", "u", "s", "m", since=0.0), now=0.0)
    delays = []
    for _ in range(4):
        book.retry_later("x", 10.0)
        delays.append(book.due(1e9)[0].next_try - 10.0)
    assert delays == [2.0, 4.0, 8.0, 16.0]


def test_a_prepared_entry_keeps_who_sent_it_and_what_was_sent():
    led = ledger()
    sent = object()
    led.prepare("x", "node-a", sent, "m", now=0.0)
    assert led.prepared("x").sender == "node-a" and led.prepared("x").sent is sent


def test_deciding_again_is_a_no_op_whatever_the_decision():
    led = ledger()
    led.prepare("x", "a", "s", "m", now=0.0)
    led.decide("x", COMMITTED, now=1.0)
    assert led.decide("x", COMMITTED, now=2.0) is None  # a repeated commit, not "never prepared"
    assert led.decide("x", ABORTED, now=2.0) is None and led.outcome("x") == COMMITTED


def test_outcomes_are_forgotten_exactly_remember_s_later_oldest_first():
    led = ledger(remember_s=10.0)
    led.prepare("p", "a", "s", "m", now=0.0)
    led.decide("p", COMMITTED, now=0.0)
    led.decide("u", ABORTED, now=0.0)  # never prepared
    led.decide("v", ABORTED, now=5.0)
    led.expire(now=9.999)
    assert (led.outcome("p"), led.outcome("u")) == (COMMITTED, ABORTED)
    led.expire(now=10.0)
    assert (led.outcome("p"), led.outcome("u"), led.outcome("v")) == (None, None, ABORTED)
    led.expire(now=15.0)
    assert led.outcome("v") is None


def test_the_oldest_outcome_is_the_one_forgotten_when_memory_is_full():
    led = ledger(max_remembered=2)
    for i, xid in enumerate(("p1", "p2", "p3")):
        led.prepare(xid, "a", "s", "m", now=float(i))
        led.decide(xid, COMMITTED, now=float(i))
    assert [led.outcome(x) for x in ("p1", "p2", "p3")] == [None, COMMITTED, COMMITTED]
    for xid in ("u1", "u2", "u3"):
        led.decide(xid, ABORTED, now=5.0)
    assert [led.outcome(x) for x in ("u1", "u2", "u3")] == [None, ABORTED, ABORTED]


def test_documented_defaults():
    """Outcomes are remembered 10 minutes (65,536 at most); a doubt is asked about again with a backoff
    from 0.1 s up to 30 s, given up after 2 minutes, and at most 4 are kept (docs/liveness.md)."""
    led = ledger()
    assert (led.remember_s, led.max_remembered) == (600.0, 65536)
    book = DoubtBook()
    assert (book.give_up_s, book.retry_base, book.retry_max, book.max_entries) == (120.0, 0.1, 30.0, 4)

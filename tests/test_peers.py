import random

from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.pex import FORGETTABLE


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_ignores_self_and_reports_new_peers():
    t = PeerTable("me")
    assert not t.upsert("me", "http://x:1", "digits", "mdns")
    assert t.upsert("a", "http://a:1", "digits", "mdns")
    assert not t.upsert("a", "http://a:1", "digits", "mdns")
    assert t.upsert("a", "http://a:2", "digits", "mdns")  # moved
    assert len(t) == 1 and t.get("a").url == "http://a:2"


def test_failures_back_off_exponentially_and_success_resets():
    clock = Clock()
    t = PeerTable("me", backoff_base=1.0, backoff_max=8.0, clock=clock)
    t.upsert("a", "http://a:1", None, "static")
    delays = []
    for _ in range(5):
        t.mark_failed("a")
        delays.append(t.get("a").retry_at - clock.t)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert t.candidates() == []
    clock.t += 8.0
    assert [p.id for p in t.candidates()] == ["a"]
    t.mark_ok("a")
    assert t.get("a").alive and t.get("a").retry_at == 0.0


def test_choose_is_uniform_over_live_peers():
    t = PeerTable("me", clock=Clock())
    for p in "abcd":
        t.upsert(p, f"http://{p}:1", None, "mdns")
    t.mark_failed("d")
    rng = random.Random(0)
    counts = {}
    for _ in range(3000):
        p = t.choose(rng).id
        counts[p] = counts.get(p, 0) + 1
    assert set(counts) == {"a", "b", "c"}
    assert all(900 < c < 1100 for c in counts.values())
    assert PeerTable("me").choose(rng) is None


def test_describe_lists_peers_with_liveness():
    t = PeerTable("me", clock=Clock())
    t.upsert("b", "http://b:1", "digits", "static")
    t.upsert("a", "http://a:1", "digits", "mdns")
    t.mark_ok("a")
    t.mark_failed("b")
    rows = t.describe()
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["alive"] and rows[0]["last_ok_s_ago"] == 0.0 and rows[0]["source"] == "mdns"
    assert not rows[1]["alive"] and rows[1]["failures"] == 1
    assert t.remove("a") and not t.remove("a")


def test_busy_answers_back_off_from_the_second_without_counting_as_failures():
    clock = Clock()
    t = PeerTable("me", backoff_base=1.0, backoff_max=8.0, clock=clock)
    t.upsert("a", "http://a:1", None, "mdns")
    t.mark_busy("a")
    assert t.get("a").retry_at == 0.0  # one 409 is normal: try again next round
    t.mark_busy("a")
    t.mark_busy("a")
    assert t.get("a").retry_at == clock.t + 2.0 and t.get("a").failures == 0 and t.get("a").alive
    assert t.expire(("mdns",), 1) == []  # busy is not failing: never forgotten for it
    t.mark_ok("a")
    assert t.get("a").busy == 0 and t.get("a").retry_at == 0.0


def test_a_peer_announced_again_is_tried_at_once():
    clock = Clock()
    t = PeerTable("me", clock=clock)
    t.upsert("a", "http://a:1", None, "mdns")
    for _ in range(4):
        t.mark_failed("a")
    assert t.candidates() == []
    t.refresh("a")
    assert [p.id for p in t.candidates()] == ["a"] and t.get("a").failures == 4


def test_choose_skips_excluded_peers_and_only_working_peers_are_shared():
    t = PeerTable("me", clock=Clock())
    for p in "abc":
        t.upsert(p, f"http://{p}:1", None, "static")
    t.mark_failed("c")
    rng = random.Random(1)
    assert {t.choose(rng, exclude={"a"}).id for _ in range(50)} == {"b"}
    assert t.choose(rng, exclude={"a", "b"}) is None
    assert sorted(p.id for p in t.working()) == ["a", "b"]
    rows = t.describe(t.working())
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["retry_in_s"] == 0.0 for r in rows)


def test_timeouts_from_every_source_count_and_only_learned_peers_are_forgotten():
    t = PeerTable("me", clock=Clock())
    for source in ("mdns", "static", "dns", "pex", "inbound"):
        t.upsert(source, f"http://{source}:1", None, source)
        for _ in range(5):
            t.mark_failed(source)
        assert t.get(source).failures == 5 and t.get(source).retry_at > 0
    assert sorted(t.expire(("dns", "pex", "inbound"), 5)) == ["dns", "inbound", "pex"]
    assert sorted(p.id for p in t.all()) == ["mdns", "static"]


def test_membership_and_self_are_told_apart():
    t = PeerTable("me", clock=Clock())
    t.upsert("a", "http://a:1", None, "static")
    assert "a" in t and "z" not in t and "me" not in t
    assert t.ignore("me", "http://me:1", "anything") is False and t.ignored() == []  # never ignores itself
    assert t.ignore("b", "http://b:1", "other task") is True and t.ignore("b", "http://b:1", "other task") is False
    assert t.ignore("b", "http://b:1", "other cluster") is True  # a new reason is news


def test_the_second_busy_answer_in_a_row_starts_the_backoff():
    clock = Clock()
    t = PeerTable("me", backoff_base=1.0, backoff_max=8.0, clock=clock)
    t.upsert("a", "http://a:1", None, "mdns")
    t.mark_busy("a")
    assert t.get("a").retry_at == 0.0
    t.mark_busy("a")
    assert t.get("a").retry_at == clock.t + 1.0  # from the second 409 on
    for p in "a":
        t.mark_failed(p)
    t.refresh("a")
    assert t.get("a").retry_at == 0.0


def test_an_ignored_peer_leaves_the_table_and_is_listed_with_its_reason():
    t = PeerTable("me", clock=Clock())
    t.upsert("a", "http://a:1", None, "mdns")
    t.ignore("a", "http://a:1", "other task")
    assert "a" not in t and t.choose(random.Random(0)) is None
    t.ignore("b", None, "other cluster")
    assert t.ignored() == [
        {"id": "a", "url": "http://a:1", "reason": "other task"},
        {"id": "b", "url": "", "reason": "other cluster"},
    ]


def test_the_ignored_list_is_bounded_and_forgets_the_oldest_first(monkeypatch):
    import gossipfl.discovery.peers as peers

    monkeypatch.setattr(peers, "MAX_IGNORED", 3)
    t = PeerTable("me", clock=Clock())
    for name in "abc":
        t.ignore(name, None, "other task")
    t.ignore("b", None, "other model")  # already listed: nothing is evicted for it
    assert [e["id"] for e in t.ignored()] == ["a", "b", "c"]
    t.ignore("d", None, "other task")
    assert [e["id"] for e in t.ignored()] == ["b", "c", "d"]


def test_times_in_the_peer_list_are_in_milliseconds():
    clock = Clock()
    t = PeerTable("me", backoff_base=1.0, clock=clock)
    t.upsert("a", "http://a:1", None, "static")
    t.mark_ok("a")
    t.mark_failed("a")
    clock.t += 0.123456
    (row,) = t.describe()
    assert row["last_ok_s_ago"] == 0.123 and row["retry_in_s"] == 0.877


def test_forgettable_peers_age_out():
    now = [0.0]
    table = PeerTable("me", clock=lambda: now[0])
    for pid, source in [("a", "pex"), ("b", "dns"), ("c", "static"), ("d", "mdns"), ("e", "pex")]:
        table.upsert(pid, f"http://{pid}:1", "digits", source)
    for _ in range(5):
        for pid in "abcd":
            table.mark_failed(pid)
    assert table.expire(FORGETTABLE, 5) == ["a", "b"]  # explicit seeds and mDNS peers stay
    assert sorted(p.id for p in table.all()) == ["c", "d", "e"]


def test_learned_sources_do_not_displace_a_working_seed_or_mdns_peer():
    table = PeerTable("me")
    table.upsert("s", "http://10.0.0.1:1", "digits", "static")
    table.mark_ok("s")
    assert not table.upsert("s", "http://6.6.6.6:1", "digits", "inbound")  # a working seed stays where it is
    assert table.get("s").url == "http://10.0.0.1:1"
    table.mark_failed("s")
    assert table.upsert("s", "http://10.0.0.2:1", "digits", "pex")  # a failing one may move, and stays a seed
    assert (table.get("s").url, table.get("s").source) == ("http://10.0.0.2:1", "static")


def test_a_peer_announced_again_keeps_what_it_said_before_and_leaves_the_ignored_list():
    t = PeerTable("me")
    t.ignore("a", "http://a:1", "other task")
    assert t.upsert("a", "http://a:1", "digits", "mdns")  # compatible now (restarted with our task)
    assert t.ignored() == [] and t.get("a").task == "digits"
    assert not t.upsert("a", "http://a:1", None, "pex")  # a refresh that does not say the task keeps it
    assert t.get("a").task == "digits"
    t.upsert("a", "http://a:1", "digits-cnn", "mdns")
    assert t.get("a").task == "digits-cnn"
    t.ignore("b", None, "other task")
    t.remove("b")
    assert t.ignored() == []


def test_the_default_backoff_doubles_from_1_s_to_30_s():
    clock = Clock()
    t = PeerTable("me", clock=clock)
    t.upsert("a", "http://a:1", None, "static")
    delays = []
    for _ in range(7):
        t.mark_failed("a")
        delays.append(t.get("a").retry_at - clock.t)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_peer_that_failed_authentication_sits_out_then_is_tried_again():
    clock = Clock()
    t = PeerTable("me", clock=clock)
    t.upsert("a", "http://a:1", "digits", "mdns")
    t.mark_failed("a")
    assert t.ignore("a", "http://a:1", "authentication: bad signature", for_s=60)
    assert "a" not in t and t.shunned("http://a:1") and t.choose(random.Random(0)) is None
    assert t.ignored() == [{"id": "a", "url": "http://a:1", "reason": "authentication: bad signature"}]
    assert not t.upsert("a", "http://a:1", "digits", "mdns")  # discovery cannot put it back meanwhile
    clock.t += 59.9
    assert t.choose(random.Random(0)) is None and t.shunned("http://a:1")
    clock.t += 0.2
    peer = t.choose(random.Random(0))  # its time out is over: tried again, as the mDNS peer it was
    assert peer is not None and peer.id == "a" and peer.source == "mdns" and peer.failures == 0
    assert t.ignored() == [] and not t.shunned("http://a:1")
    t.ignore("a", "http://a:1", "authentication: bad signature", for_s=60)
    assert "a" not in t  # failing again sends it out again


def test_a_rogue_claiming_an_honest_id_gets_its_own_address_shunned_not_the_honest_node():
    clock = Clock()
    t = PeerTable("me", clock=clock)
    t.upsert("b", "http://b:1", "digits", "mdns")
    t.mark_ok("b")
    # an unauthenticated announcement of "b" at the rogue's address fails authentication there
    t.ignore("b", "http://rogue:1", "authentication: reply not signed", for_s=60)
    assert t.get("b").url == "http://b:1" and t.shunned("http://rogue:1") and not t.shunned("http://b:1")
    assert not t.upsert("b", "http://rogue:1", "digits", "mdns")  # the rogue's address stays out
    assert t.get("b").url == "http://b:1"
    t.remove("b")
    assert t.upsert("b", "http://b:1", "digits", "inbound")  # the honest node comes back at its own address


def test_an_address_that_failed_authentication_is_shunned_by_url():
    clock = Clock()
    t = PeerTable("me", clock=clock)
    t.ignore("http://x:1", "http://x:1", "authentication: refused", for_s=10)
    assert t.shunned("http://x:1") and not t.shunned("http://y:1")
    clock.t += 11
    assert not t.shunned("http://x:1") and len(t) == 0  # nothing to readmit: it was never a peer

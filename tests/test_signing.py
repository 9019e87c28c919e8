"""The cluster key's signatures, the nonce book, and reading secret files: pure, no network."""

from __future__ import annotations

import os

import pytest

from gossipfl.security import signing
from gossipfl.security.membership import Membership
from gossipfl.security.secrets import SecretError, loosely_protected, read_key_file, read_token
from gossipfl.security.signing import HEADER, ClusterKey, NonceBook, Unauthorized

KEY = b"k" * 32
OTHER = b"o" * 32


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def signed(key: bytes = KEY, clock: Clock | None = None, **kw) -> tuple[str, str]:
    """A request signed by "a" for "b" (by default), as (header, nonce)."""
    k = ClusterKey(key, clock=clock or Clock())
    method, target = kw.get("method", "POST"), kw.get("target", "/v1/gossip")
    return k.sign_request(method, target, kw.get("sender", "a"), kw.get("to", "b"), kw.get("body", b"x"))


def verify(k: ClusterKey, method: str, target: str, header: str | None, body: bytes, recipient: str = "b"):
    return k.verify_request(method, target, header, recipient, body)


def test_a_signed_request_verifies_once_and_names_its_sender():
    clock = Clock()
    header, nonce = signed(clock=clock)
    verifier = ClusterKey(KEY, clock=clock)
    s = verify(verifier, "POST", "/v1/gossip", header, b"x")
    assert (s.signer, s.nonce) == ("a", nonce)
    with pytest.raises(Unauthorized, match="replayed"):
        verify(verifier, "POST", "/v1/gossip", header, b"x")


@pytest.mark.parametrize(
    "method, target, body",
    [("GET", "/v1/gossip", b"x"), ("POST", "/v1/gossip/abc/commit", b"x"), ("POST", "/v1/gossip", b"y")],
)
def test_any_change_to_method_path_or_body_breaks_the_signature(method, target, body):
    header, _ = signed()
    with pytest.raises(Unauthorized, match="bad signature"):
        verify(ClusterKey(KEY, clock=Clock()), method, target, header, body)


def test_another_key_or_another_sender_breaks_the_signature():
    header, _ = signed(key=OTHER)
    with pytest.raises(Unauthorized, match="bad signature"):
        verify(ClusterKey(KEY, clock=Clock()), "POST", "/v1/gossip", header, b"x")
    header, _ = signed()
    forged = header.replace("id=a,", "id=b,")
    with pytest.raises(Unauthorized, match="bad signature"):
        verify(ClusterKey(KEY, clock=Clock()), "POST", "/v1/gossip", forged, b"x")


@pytest.mark.parametrize("skew", [-31.0, 31.0])
def test_a_request_outside_the_window_is_refused(skew):
    clock = Clock()
    header, _ = signed(clock=clock)
    with pytest.raises(Unauthorized, match="timestamp"):
        verify(ClusterKey(KEY, clock=Clock(clock.t + skew)), "POST", "/v1/gossip", header, b"x")
    # within the window it passes
    verify(ClusterKey(KEY, clock=Clock(clock.t + skew * 29 / 31)), "POST", "/v1/gossip", header, b"x")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "v2 id=a,to=b,ts=1,nonce=" + "0" * 32 + ",hsig=" + "0" * 64 + ",sig=" + "0" * 64,
        "v1 id=a,to=b,ts=1,nonce=" + "0" * 31 + ",hsig=" + "0" * 64 + ",sig=" + "0" * 64,
        "v1 id=a,to=b,ts=-1,nonce=" + "0" * 32 + ",hsig=" + "0" * 64 + ",sig=" + "0" * 64,
        "v1 id=a b,to=b,ts=1,nonce=" + "0" * 32 + ",hsig=" + "0" * 64 + ",sig=" + "0" * 64,
        "v1 id=a,to=b,ts=1,nonce=" + "0" * 32 + ",hsig=" + "0" * 64 + ",sig=" + "0" * 64 + " ",
        "v1 id=a,ts=1,nonce=" + "0" * 32 + ",sig=" + "0" * 64,  # the first format, without recipient
        "Bearer abc",
    ],
)
def test_missing_or_malformed_headers_are_refused(header):
    with pytest.raises(Unauthorized, match="missing|malformed"):
        verify(ClusterKey(KEY, clock=Clock()), "POST", "/v1/gossip", header, b"x")


def test_a_request_is_only_good_at_the_node_it_was_meant_for():
    clock = Clock()
    header, _ = signed(clock=clock, to="b")
    with pytest.raises(Unauthorized, match="meant for 'b'"):
        verify(ClusterKey(KEY, clock=clock), "POST", "/v1/gossip", header, b"x", recipient="c")
    verify(ClusterKey(KEY, clock=clock), "POST", "/v1/gossip", header, b"x", recipient="b")
    # a read of a node whose id the sender does not know yet: any recipient, GET only
    header, _ = signed(clock=clock, to="", method="GET", target="/v1/status", body=b"")
    verify(ClusterKey(KEY, clock=clock), "GET", "/v1/status", header, b"", recipient="c")
    header, _ = signed(clock=clock, to="")
    with pytest.raises(Unauthorized, match="any node"):
        verify(ClusterKey(KEY, clock=clock), "POST", "/v1/gossip", header, b"x", recipient="c")


def test_the_head_is_checked_before_the_body_and_binds_its_length():
    clock = Clock()
    k = ClusterKey(KEY, clock=clock)
    header, _ = signed(clock=clock, body=b"x" * 10)
    with pytest.raises(Unauthorized, match="bad signature"):  # another length declared than was signed
        k.check_head("POST", "/v1/gossip", header, "b", 11)
    s = k.check_head("POST", "/v1/gossip", header, "b", 10)
    with pytest.raises(Unauthorized, match="over the body"):
        k.check_body(s, "POST", "/v1/gossip", b"y" * 10)
    k.check_body(s, "POST", "/v1/gossip", b"x" * 10)
    clock.t += 3600  # a slow body does not make a request stale: freshness is judged on the head
    k.check_body(s, "POST", "/v1/gossip", b"x" * 10)


def test_a_forged_head_does_not_burn_the_nonce_of_the_real_request():
    clock = Clock()
    header, _ = signed(clock=clock)
    verifier = ClusterKey(KEY, clock=clock)
    s = signing.parse(header)
    forged = signing.render(signing.Signature(s.signer, s.to, s.ts, s.nonce, "0" * 64, s.sig))
    with pytest.raises(Unauthorized, match="bad signature"):
        verify(verifier, "POST", "/v1/gossip", forged, b"x")
    verify(verifier, "POST", "/v1/gossip", header, b"x")


def test_replies_are_bound_to_their_request_and_body():
    clock = Clock()
    k = ClusterKey(KEY, clock=clock)
    _, nonce = k.sign_request("POST", "/v1/gossip", "a", "b", b"x")
    reply = k.sign_reply(200, "POST", "/v1/gossip", nonce, "b", b"state")
    assert k.verify_reply(reply, 200, "POST", "/v1/gossip", nonce, b"state") == "b"
    _, other_nonce = k.sign_request("POST", "/v1/gossip", "a", "b", b"x")
    with pytest.raises(Unauthorized, match="another request"):  # a genuine reply, replayed to another request
        k.verify_reply(reply, 200, "POST", "/v1/gossip", other_nonce, b"state")
    for status, target, body in (
        (409, "/v1/gossip", b"state"),
        (200, "/v1/status", b"state"),
        (200, "/v1/gossip", b"other"),
    ):
        with pytest.raises(Unauthorized, match="bad signature"):
            k.verify_reply(reply, status, "POST", target, nonce, body)
    with pytest.raises(Unauthorized, match="not signed"):
        k.verify_reply(None, 200, "POST", "/v1/gossip", nonce, b"state")
    with pytest.raises(Unauthorized, match="bad signature"):
        ClusterKey(OTHER, clock=clock).verify_reply(reply, 200, "POST", "/v1/gossip", nonce, b"state")
    clock.t += 3600  # a reply is fresh because its request's nonce is: a large one may take its time
    assert k.verify_reply(reply, 200, "POST", "/v1/gossip", nonce, b"state") == "b"


def test_the_nonce_book_forgets_what_can_no_longer_be_fresh_and_refuses_when_full():
    book = NonceBook(limit=2)
    assert book.add("n1", until=10.0, now=0.0) == ""
    assert "replay" in book.add("n1", until=10.0, now=5.0)
    assert book.add("n2", until=20.0, now=5.0) == ""
    assert "too many" in book.add("n3", until=20.0, now=5.0)  # full: refuse rather than forget a live nonce
    assert book.add("n3", until=30.0, now=11.0) == ""  # n1 expired and was dropped
    assert len(book) == 2


def test_the_key_never_shows_in_its_repr_or_its_fingerprint():
    k = ClusterKey(KEY)
    assert KEY.decode() not in repr(k) and KEY.hex() not in repr(k) and len(k.key_id) == 12
    assert ClusterKey(OTHER).key_id != k.key_id


def test_membership_ties_the_reply_to_the_peer_expected_and_the_allow_list():
    clock = Clock()
    a = Membership("a", key=ClusterKey(KEY, clock=clock))
    b = Membership("b", key=ClusterKey(KEY, clock=clock))
    headers, pending = a.sign("GET", "/v1/status", to="b")
    admitted = b.check_head("GET", "/v1/status", headers, 0, None)
    assert admitted.member == "a" and b.check_body(admitted, "GET", "/v1/status", b"") == pending
    reply = b.reply_headers(pending, 200, b"{}")
    assert a.check_reply(pending, 200, reply, b"{}", expect="b") == "b"
    with pytest.raises(Unauthorized, match="expected 'c'"):
        a.check_reply(pending, 200, reply, b"{}", expect="c")
    a.allow = frozenset({"c"})
    with pytest.raises(Unauthorized, match="allow-ids"):
        a.check_reply(pending, 200, reply, b"{}", expect=None)
    headers, _ = a.sign("GET", "/v1/status", to="b")
    b.allow = frozenset({"c"})
    with pytest.raises(Unauthorized, match="allow-ids"):
        b.check_head("GET", "/v1/status", headers, 0, None)
    assert Membership("x").check_head("GET", "/", {}, 0, None).member is None  # open node
    assert HEADER not in Membership("x").sign("GET", "/")[0]


def test_bearer_tokens_are_checked_exactly():
    m = Membership("a", read_token="s3cret")
    assert m.bearer_ok("Bearer s3cret")
    for bad in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "bearer s3cret", "Bearer \udcff"):
        assert not m.bearer_ok(bad), bad
    assert Membership("a").bearer_ok(None)


def test_key_files_must_hold_32_bytes_and_errors_name_the_file_not_the_key(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789abcdef0123456789abcd\n")  # 31 bytes, the newline included
    with pytest.raises(SecretError) as e:
        read_key_file(short)
    assert str(short) in str(e.value) and "31 bytes" in str(e.value) and "0123456789" not in str(e.value)
    with pytest.raises(SecretError, match="No such file"):
        read_key_file(tmp_path / "missing.key")
    unreadable = tmp_path / "dir.key"
    unreadable.mkdir()
    with pytest.raises(SecretError, match="dir.key"):
        read_key_file(unreadable)
    good = tmp_path / "good.key"
    good.write_bytes(bytes(range(33, 64)) + b"\n")  # a trailing newline is key material like any byte
    os.chmod(good, 0o644)
    assert read_key_file(good) == bytes(range(33, 64)) + b"\n" and loosely_protected(good)
    for mode in (0o600, 0o640):  # the owner, or the owner's group (a mounted secret's fsGroup), only
        os.chmod(good, mode)
        assert not loosely_protected(good)


def test_read_tokens_come_from_one_place_and_are_plain(tmp_path):
    f = tmp_path / "token"
    f.write_text("abc123\n")
    assert read_token(None, f) == "abc123" and read_token("xyz", None) == "xyz" and read_token(None, None) is None
    with pytest.raises(SecretError, match="not both"):
        read_token("xyz", f)
    for bad in ("", "a b", "a\tb", "é"):
        with pytest.raises(SecretError, match="printable ASCII"):
            read_token(bad, None)


def test_headers_render_and_parse_back():
    s = signing.Signature("node-1", "node-2", 12, "ab" * 16, "ef" * 32, "cd" * 32)
    assert signing.parse(signing.render(s)) == s
    s = signing.Signature("node-1", "", 12, "ab" * 16, "ef" * 32, "cd" * 32)
    assert signing.parse(signing.render(s)) == s


def test_a_full_nonce_book_is_an_overload_not_an_authentication_failure():
    clock = Clock()
    k = ClusterKey(KEY, clock=clock, nonces=1)
    verify(k, "POST", "/v1/gossip", signed(clock=clock)[0], b"x")
    with pytest.raises(signing.Overloaded, match="too many"):  # 503 and retry, not 401 and a shun
        verify(k, "POST", "/v1/gossip", signed(clock=clock)[0], b"x")

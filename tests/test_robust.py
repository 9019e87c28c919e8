"""Self-centred clipping (--clip-radius): pure maths, and over real HTTP a poisoned model that moves a node
by at most the radius, or is refused when implausibly far."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossipfl.protocol import wire
from gossipfl.protocol.robust import MIN_HISTORY, RobustMerge, TooFar, clip_toward, distance, norm, parse_radius

from .helpers import message, params_of, running


def model(v: float, n: int = 5) -> dict[str, np.ndarray]:
    return {"w": np.full((n,), v, dtype=np.float32), "b": np.full((2,), v, dtype=np.float32),
            "count": np.array([7], dtype=np.int64)}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    st.floats(1e-3, 1e3),
)
def test_clipping_bounds_the_distance_and_keeps_the_direction(a, b, tau):
    mine = {"w": np.array(a, dtype=np.float64)}
    theirs = {"w": np.array(b, dtype=np.float64)}
    out = clip_toward(mine, theirs, tau)
    d, d_out = distance(mine, theirs), distance(mine, out)
    assert d_out <= min(d, tau) * (1 + 1e-9) + 1e-9
    if d <= tau:
        assert np.array_equal(out["w"], theirs["w"])
    else:
        np.testing.assert_allclose((out["w"] - mine["w"]) * d, (theirs["w"] - mine["w"]) * d_out, atol=1e-6)


def test_counters_are_left_out_of_the_distance_and_never_clipped():
    mine, theirs = model(0.0), model(3.0)
    theirs["count"] = np.array([10**9], dtype=np.int64)
    assert distance(mine, theirs) == pytest.approx(3.0 * np.sqrt(7)) == norm(theirs)
    out = clip_toward(mine, theirs, 1.0)
    assert out["count"][0] == 10**9 and out["w"].dtype == np.float32
    assert distance(mine, out) == pytest.approx(1.0, rel=1e-5)


def test_auto_radius_is_the_median_of_the_partners_distances_and_outliers_are_refused():
    r = RobustMerge("auto", refuse_factor=20)
    mine = model(0.0)
    for i in range(MIN_HISTORY):  # distance sqrt(7) each: the median; the first has nothing to compare with
        assert r.apply(mine, model(1.0), f"p{i}").clipped == (i == 0)
    far = r.apply(mine, model(10.0), "x")  # 10x the median: clipped to it, not refused
    assert far.clipped and far.tau == pytest.approx(np.sqrt(7), rel=1e-6)
    assert distance(mine, far.params) == pytest.approx(np.sqrt(7), rel=1e-5)
    with pytest.raises(TooFar, match="implausibly far"):
        r.apply(mine, model(100.0), "y")
    assert (r.clipped, r.refused) == (2, 1)
    with pytest.raises(TooFar, match="not finite"):
        r.apply(mine, model(np.inf), "z")


def test_a_minority_of_far_partners_cannot_raise_the_auto_radius():
    r = RobustMerge("auto", refuse_factor=0)  # never refuse: only clipping stands between
    mine = model(0.0)
    taus = [r.apply(mine, model(100.0 if i % 3 == 0 else 1.0), f"p{i}").tau for i in range(60)]
    assert max(taus[10:]) == pytest.approx(np.sqrt(7), rel=1e-6)


def test_one_partner_sending_many_far_models_counts_once():
    """A member that streams far models (merged, refused, or prepared and aborted) cannot drag the radius:
    each partner's latest distance counts once."""
    r = RobustMerge("auto", refuse_factor=20)
    mine = model(0.0)
    for i in range(10):
        r.apply(mine, model(1.0), f"honest{i}")
    for _ in range(100):
        try:
            r.apply(mine, model(1000.0), "mallory")
        except TooFar:
            pass
    poisoned = r.apply(mine, model(15.0), "mallory")
    assert poisoned.clipped and poisoned.tau == pytest.approx(np.sqrt(7), rel=1e-6)
    assert r.describe()["partners"] == 11


def test_the_first_partners_cannot_set_their_own_radius():
    """The first partner ever moves a node not at all (nothing to compare it with); among few partners one far
    one does not set the radius; and a partner's own distance never counts for its radius."""
    r = RobustMerge("auto", refuse_factor=0)
    first = r.apply(model(0.0), model(100.0), "attacker")
    assert first.clipped and first.tau == 0 and distance(model(0.0), first.params) == 0
    r.apply(model(0.0), model(1.0), "honest")
    again = r.apply(model(0.0), model(100.0), "attacker")  # others: honest (sqrt 7) only
    assert again.tau == pytest.approx(np.sqrt(7), rel=1e-6)
    r2 = RobustMerge("auto", refuse_factor=0)
    r2.apply(model(0.0), model(1.0), "h1")
    r2.apply(model(0.0), model(100.0), "x1")
    assert r2.apply(model(0.0), model(100.0), "x2").tau == pytest.approx(np.sqrt(7), rel=1e-6)  # the lower middle


def test_a_lone_partner_is_clipped_to_its_previous_distance():
    r = RobustMerge("auto", refuse_factor=0)
    assert r.apply(model(0.0), model(1.0), "only").tau == 0  # the first time: nothing to compare with
    out = r.apply(model(0.0), model(2.0), "only")  # then its previous distance: two nodes still learn
    assert out.tau == pytest.approx(np.sqrt(7), rel=1e-6) and out.clipped


def test_coinciding_models_refuse_nothing():
    r = RobustMerge("auto", refuse_factor=2)
    for i in range(MIN_HISTORY):
        r.apply(model(1.0), model(1.0), f"p{i}")  # converged: every distance 0
    out = r.apply(model(1.0), model(1.0 + 1e-7), "q")  # a tiny difference is neither refused nor zeroed
    assert out.tau > 0


def test_no_refusal_before_enough_history_and_a_fixed_radius():
    r = RobustMerge(0.5, refuse_factor=2)
    out = r.apply(model(0.0), model(100.0), "a")  # the first model ever: clipped, not refused
    assert out.clipped and out.tau == 0.5


@pytest.mark.parametrize("text, expected", [(None, None), ("off", None), ("auto", "auto"), ("0.5", 0.5)])
def test_parse_radius(text, expected):
    assert parse_radius(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "big"])
def test_parse_radius_refuses_nonsense(text):
    with pytest.raises(ValueError, match="clip-radius"):
        parse_radius(text)


async def test_a_poisoned_exchange_moves_a_clipping_node_by_at_most_half_the_radius(make_config, http):
    tau = 0.05
    async with running(make_config(no_train=True, clip_radius=str(tau), refuse_factor=0)) as (node,):
        before = params_of(node)
        poison = {k: v * 100 if v.dtype.kind == "f" else v for k, v in before.items()}
        xid = wire.new_xid()
        body = message(node, poison, sender="attacker", xid=xid)
        async with http.post(node.url + "/v1/gossip", data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as r:
            assert r.status == 200
        async with http.post(f"{node.url}/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == "committed"
        for _ in range(50):
            if node.learner.merges:
                break
            await __import__("asyncio").sleep(0.02)
        moved = distance(before, params_of(node))
        assert node.learner.merges == 1 and 0 < moved <= tau / 2 * (1 + 1e-4)
        robust = node.status()["merge"]["robust"]
        assert robust["clipped"] == 1 and robust["tau"] == tau


async def test_an_implausibly_far_model_is_refused_with_400_and_counted(make_config, http):
    async with running(make_config(no_train=True, clip_radius="auto", refuse_factor=5)) as (node,):
        base = params_of(node)
        for i in range(MIN_HISTORY + 1):  # honest-looking partners: small, varied distances
            near = {k: v + 0.01 * (1 + i % 3) if v.dtype.kind == "f" else v for k, v in base.items()}
            xid = wire.new_xid()
            async with http.post(node.url + "/v1/gossip", data=message(node, near, sender=f"p{i}", xid=xid),
                                 headers={"Content-Type": wire.CONTENT_TYPE}) as r:  # fmt: skip
                assert r.status == 200
            async with http.post(f"{node.url}/v1/gossip/{xid}/abort") as r:  # leave room; merge nothing
                assert r.status == 200
        far = {k: v * 100 if v.dtype.kind == "f" else v for k, v in base.items()}
        async with http.post(node.url + "/v1/gossip", data=message(node, far, sender="attacker"),
                             headers={"Content-Type": wire.CONTENT_TYPE}) as r:  # fmt: skip
            assert r.status == 400 and "implausibly far" in (await r.json())["error"]
        assert node.learner.merges == 0 and node.status()["merge"]["robust"]["refused_too_far"] == 1
        async with http.get(node.url + "/metrics") as r:
            text = await r.text()
        assert "gossipfl_models_refused_too_far_total 1.0" in text

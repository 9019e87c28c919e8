import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl import merge
from gossipfl.merge import Side

finite = st.floats(-1e3, 1e3, width=32)
arr = hnp.arrays(np.float32, (4, 3), elements=finite)
sides = st.builds(
    lambda p, age, n, w: Side({"w": p}, age, n, w),
    arr,
    st.integers(0, 10_000),
    st.integers(0, 5_000),
    st.floats(1e-3, 1e3),
)
RULES = sorted(merge.RULES)


def f64(x):
    return np.asarray(x, dtype=np.float64)


@settings(max_examples=150, deadline=None)
@given(a=sides, b=sides, rule=st.sampled_from(RULES))
def test_every_rule_is_symmetric_bit_for_bit_and_convex(a, b, rule):
    ab, ba = merge.RULES[rule](a, b), merge.RULES[rule](b, a)
    np.testing.assert_array_equal(ab.params["w"], ba.params["w"])  # both partners end identical
    assert ab.params["w"].dtype == np.float32
    assert ab.age == ba.age == max(a.age, b.age)
    assert ab.weight == ba.weight
    lo = np.minimum(a.params["w"], b.params["w"])
    hi = np.maximum(a.params["w"], b.params["w"])
    slack = 1e-5 * (np.abs(lo) + np.abs(hi)) + 1e-6
    assert np.all(ab.params["w"] >= lo - slack) and np.all(ab.params["w"] <= hi + slack)


@settings(max_examples=150, deadline=None)
@given(a=sides, b=sides, rule=st.sampled_from(RULES))
def test_every_rule_conserves_the_sum_of_pushsum_weights(a, b, rule):
    m = merge.RULES[rule](a, b)
    assert 2 * m.weight == pytest.approx(a.weight + b.weight, rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(a=sides, b=sides)
def test_average_conserves_the_sum(a, b):
    m = merge.average(a, b)
    np.testing.assert_allclose(2 * f64(m.params["w"]), f64(a.params["w"]) + f64(b.params["w"]), rtol=1e-6, atol=1e-4)


@settings(max_examples=150, deadline=None)
@given(a=sides, b=sides)
def test_samples_conserves_the_data_weighted_sum(a, b):
    m = merge.sample_weighted(a, b)
    if a.samples + b.samples == 0:
        return
    before = a.samples * f64(a.params["w"]) + b.samples * f64(b.params["w"])
    after = (a.samples + b.samples) * f64(m.params["w"])
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4 * (a.samples + b.samples))


@settings(max_examples=150, deadline=None)
@given(a=sides, b=sides)
def test_pushsum_conserves_mass_and_weighted_sum(a, b):
    m = merge.push_sum(a, b)
    before = a.weight * f64(a.params["w"]) + b.weight * f64(b.params["w"])
    after = 2 * m.weight * f64(m.params["w"])  # both partners hold (m.weight, m.params)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4 * (a.weight + b.weight))


def test_extreme_weights_and_values_do_not_overflow():
    big = np.full(3, 3.0e38, np.float32)
    for rule in merge.RULES.values():
        m = rule(Side({"w": big}, 2**62, 2**62, 1e15), Side({"w": big}, 1, 1, 1e-300))
        assert np.isfinite(m.params["w"]).all() and np.isfinite(m.weight)


def test_age_weights_by_age_and_a_fresh_model_does_not_count():
    old = Side({"w": np.array([4.0], np.float32)}, 300, 10, 1.0)
    new = Side({"w": np.array([0.0], np.float32)}, 100, 10, 1.0)
    assert merge.age_weighted(old, new).params["w"][0] == pytest.approx(3.0)
    fresh = Side({"w": np.array([-8.0], np.float32)}, 0, 10, 1.0)
    assert merge.age_weighted(old, fresh).params["w"][0] == 4.0
    both_fresh = merge.age_weighted(Side(fresh.params, 0, 1, 1.0), Side(new.params, 0, 1, 1.0))
    assert both_fresh.params["w"][0] == -4.0  # equal weights when neither has trained


def test_repeated_pushsum_converges_to_the_weighted_mean():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=3).astype(np.float32) for _ in range(6)]
    ws = [float(w) for w in rng.integers(1, 100, size=6)]
    target = sum(w * x.astype(np.float64) for w, x in zip(ws, xs, strict=True)) / sum(ws)
    nodes = [Side({"w": x}, 0, 0, w) for x, w in zip(xs, ws, strict=True)]
    for _ in range(400):
        i, j = rng.choice(6, size=2, replace=False)
        m = merge.push_sum(nodes[i], nodes[j])
        nodes[i] = nodes[j] = Side(m.params, 0, 0, m.weight)
    for n in nodes:
        np.testing.assert_allclose(n.params["w"], target, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(cur=arr, sent=arr, peer=arr)
def test_rebase_keeps_local_progress(cur, sent, peer):
    merged = merge.weighted_mean({"w": sent}, {"w": peer}, 1.0, 1.0)
    out = merge.rebase({"w": cur}, {"w": sent}, merged)["w"]
    expected = f64(cur) + (f64(merged["w"]) - f64(sent))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_rebase_without_local_progress_is_the_merge():
    sent = {"w": np.array([1.0, 2.0], np.float32)}
    merged = {"w": np.array([3.0, -1.0], np.float32)}
    np.testing.assert_array_equal(merge.rebase(sent, sent, merged)["w"], merged["w"])


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown merge rule 'median'"):
        merge.get_rule("median")

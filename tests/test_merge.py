import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.protocol import merge
from gossipfl.protocol.merge import Side

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
@given(a=arr, b=arr, local=arr, rule=st.sampled_from(["average", "samples"]))
def test_rebased_exchanges_conserve_what_the_rule_conserves_and_keep_local_steps(a, b, local, rule):
    """Partner a trained (``local``) while its exchange was in flight; b did not. Whatever the rule
    conserves (the sum, or the sample-weighted sum) is conserved up to a's local steps, which a keeps."""
    sa, sb = Side({"w": a}, 1, 3, 1.0), Side({"w": b}, 1, 5, 1.0)
    m = merge.RULES[rule](sa, sb)
    a_now = {"w": (a + local).astype(np.float32)}
    a_after = merge.apply(a_now, sa.params, m.params, changed=True)["w"]
    b_after = merge.apply(sb.params, sb.params, m.params, changed=False)["w"]
    na, nb = (1.0, 1.0) if rule == "average" else (3.0, 5.0)
    before = na * f64(a_now["w"]) + nb * f64(b)  # the conserved quantity, a's local steps included
    np.testing.assert_allclose(na * f64(a_after) + nb * f64(b_after), before, rtol=1e-5, atol=2e-3)
    np.testing.assert_array_equal(b_after, m.params["w"])  # no local change: exactly the merge
    # the local steps survive the merge: a ends where b is, plus what a did meanwhile
    np.testing.assert_allclose(f64(a_after) - f64(b_after), f64(a_now["w"]) - f64(a), rtol=1e-5, atol=2e-3)


@settings(max_examples=100, deadline=None)
@given(cur=arr, sent=arr, merged=arr, shift=arr)
def test_rebase_moves_with_the_current_model(cur, sent, merged, shift):
    """Rebase is a translation: shifting the current model shifts the result by as much."""
    one = f64(merge.rebase({"w": cur}, {"w": sent}, {"w": merged})["w"])
    moved = (cur + shift).astype(np.float32)
    two = f64(merge.rebase({"w": moved}, {"w": sent}, {"w": merged})["w"])
    np.testing.assert_allclose(two - one, f64(moved) - f64(cur), rtol=1e-5, atol=2e-3)


def test_rebase_without_local_progress_is_the_merge():
    sent = {"w": np.array([1.0, 2.0], np.float32)}
    merged = {"w": np.array([3.0, -1.0], np.float32)}
    np.testing.assert_array_equal(merge.rebase(sent, sent, merged)["w"], merged["w"])


def test_unknown_rule():
    with pytest.raises(ValueError) as e:
        merge.get_rule("median")
    assert str(e.value) == "unknown merge rule 'median' (known: average, age, samples, pushsum)"


def test_apply_is_the_merge_exactly_when_nothing_changed_and_weights_rebase():
    sent = {"w": np.array([1.0, 2.0], np.float32)}
    merged = {"w": np.array([1.5, 0.1], np.float32)}
    assert merge.apply(sent, sent, merged, changed=False)["w"] is merged["w"]
    assert merge.apply_weight(4.0, 4.0, 3.0) == 3.0
    assert merge.apply_weight(5.0, 4.0, 3.0) == 4.0  # another merge moved it by +1 meanwhile: kept


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 2**53), b=st.integers(0, 2**53))
def test_one_exchange_raises_the_younger_age_by_at_most_the_cap(a, b):
    ca, cb = merge.capped_ages(a, b)
    assert (ca, cb) == merge.capped_ages(b, a)[::-1]  # symmetric
    assert max(ca, cb) <= min(a, b) + merge.MAX_AGE_GAIN and ca <= a and cb <= b
    if abs(a - b) <= merge.MAX_AGE_GAIN:
        assert (ca, cb) == (a, b)  # honest partners, ordinarily within a few steps, are untouched
    sa, sb = Side({"w": np.zeros(1, np.float32)}, a, 1, 1.0), Side({"w": np.ones(1, np.float32)}, b, 1, 1.0)
    for rule in RULES:
        assert merge.RULES[rule](sa, sb).age == max(ca, cb)


def test_a_huge_claimed_age_gets_a_bounded_weight_under_the_age_rule():
    young = Side({"w": np.zeros(1, np.float32)}, 20_000, 1, 1.0)
    liar = Side({"w": np.ones(1, np.float32)}, 2**53, 1, 1.0)
    m = merge.age_weighted(young, liar)
    assert m.age == 30_000
    assert m.params["w"][0] == pytest.approx(30_000 / 50_000, rel=1e-6)  # not 1.0: the claim was capped


def test_a_late_merge_keeps_only_what_was_non_negative_everywhere_non_negative():
    f32 = lambda *v: np.array(v, np.float32)  # noqa: E731
    current = {"var": f32(0.0, 2.0), "w": f32(-1.0, 1.0), "empty": np.zeros(0, np.float32)}
    sent = {"var": f32(4.0, 4.0), "w": f32(1.0, 1.0), "empty": np.zeros(0, np.float32)}
    merged = {"var": f32(0.5, 3.0), "w": f32(0.0, 1.0), "empty": np.zeros(0, np.float32)}
    result = {"var": f32(-3.5, 0.5), "w": f32(-2.0, 0.25), "empty": np.zeros(0, np.float32)}
    out = merge.keep_nonnegative(result, current, sent, merged)
    assert out["var"].tolist() == [0.0, 0.5] and out["var"].dtype == np.float32  # clamped; a 0 counts as >= 0
    assert out["w"].tolist() == [-2.0, 0.25]  # had negatives somewhere: left alone
    assert out["empty"].shape == (0,)


def test_a_late_merge_keeps_the_weight_positive():
    assert merge.keep_positive_weight(-5.0, 10.0, 20.0) == 5.0  # half the smaller of current and merged
    assert merge.keep_positive_weight(7.0, 10.0, 20.0) == 7.0  # positive already: untouched


def test_rebase_keeps_each_arrays_dtype():
    cur = {"w": np.ones(3, np.float32), "h": np.ones(2, np.float16)}
    out = merge.rebase(cur, {k: v * 2 for k, v in cur.items()}, {k: v * 3 for k, v in cur.items()})
    assert out["w"].dtype == np.float32 and out["h"].dtype == np.float16
    assert out["w"].tolist() == [2.0, 2.0, 2.0]


def test_a_side_of_zero_weight_contributes_nothing_and_two_give_the_plain_mean():
    a, b = {"w": np.array([2.0], np.float32)}, {"w": np.array([-6.0], np.float32)}
    assert merge.weighted_mean(a, b, 0.0, 1.0)["w"][0] == -6.0  # a model of age 0 against one of age 1
    assert merge.weighted_mean(a, b, 1.0, 0.0)["w"][0] == 2.0
    assert merge.weighted_mean(a, b, 0.0, 0.0)["w"][0] == -2.0  # no weight on either side: the mean


def test_a_weight_is_set_exactly_when_nothing_changed_meanwhile():
    """Both partners must end with bit-identical push-sum weights: merged, not sent + (merged - sent),
    which can differ in the last bit."""
    sent, merged = 9.385958677423488, 2.834747652200631
    assert sent + (merged - sent) != merged
    assert merge.apply_weight(sent, sent, merged) == merged


def test_equal_huge_weights_give_the_plain_mean():
    a, b = {"w": np.array([2.0], np.float32)}, {"w": np.array([-6.0], np.float32)}
    assert merge.weighted_mean(a, b, 1e308, 1e308)["w"][0] == -2.0  # wa + wb overflows: not computed


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([0, 1, 7, merge.BLOCK - 1, merge.BLOCK, 2 * merge.BLOCK + 3]),
    wa=st.floats(0.01, 100),
    wb=st.floats(0.01, 100),
    seed=st.integers(0, 2**16),
)
def test_the_mean_written_in_place_has_the_same_bits_as_the_expression(n, wa, wb, seed):
    """``into``: the merge written block by block into the received arrays (no temporary of the model's size)
    gives exactly (a*pa + b*pb), for any size (0-d, blocks and a tail) and any weights."""
    rng = np.random.default_rng(seed)
    a = {"w": rng.normal(size=n).astype(np.float32), "s": np.array(rng.normal(), np.float32)}
    b = {"w": rng.normal(size=n).astype(np.float32) * 1e3, "s": np.array(rng.normal(), np.float32)}
    expected = merge.weighted_mean(a, b, wa, wb)
    into = {k: v.copy() for k, v in b.items()}
    got = merge.weighted_mean(a, into, wa, wb, into=into)
    for k in a:
        assert got[k] is into[k] and got[k].dtype == np.float32 and got[k].shape == a[k].shape
        np.testing.assert_array_equal(got[k], expected[k])

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl import merge

finite = st.floats(-1e3, 1e3, width=32)
arr = hnp.arrays(np.float32, (4, 3), elements=finite)


@settings(max_examples=200, deadline=None)
@given(a=arr, b=arr)
def test_average_conserves_the_sum_and_is_bitwise_symmetric(a, b):
    ab = merge.average({"w": a}, {"w": b})["w"]
    ba = merge.average({"w": b}, {"w": a})["w"]
    np.testing.assert_array_equal(ab, ba)  # both partners end with identical bits
    assert ab.dtype == np.float32
    # the two partners' sum after the exchange equals their sum before, up to float32 rounding
    np.testing.assert_allclose(
        2 * ab.astype(np.float64), a.astype(np.float64) + b.astype(np.float64), rtol=1e-6, atol=1e-4
    )


@settings(max_examples=100, deadline=None)
@given(cur=arr, sent=arr, peer=arr)
def test_rebase_keeps_local_progress(cur, sent, peer):
    merged = merge.average({"w": sent}, {"w": peer})
    out = merge.rebase({"w": cur}, {"w": sent}, merged)["w"]
    expected = cur.astype(np.float64) + (merged["w"].astype(np.float64) - sent.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_rebase_without_local_progress_is_the_merge():
    sent = {"w": np.array([1.0, 2.0], np.float32)}
    merged = {"w": np.array([3.0, -1.0], np.float32)}
    np.testing.assert_array_equal(merge.rebase(sent, sent, merged)["w"], merged["w"])


def test_merged_age_is_the_older():
    assert merge.merged_age(3, 10) == 10 and merge.merged_age(10, 3) == 10

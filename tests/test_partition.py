import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossipfl.learning.partition import iid_partition


@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=2000),
    k=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_covers_every_sample_exactly_once_and_balances(labels, k, seed):
    labels = np.array(labels)
    n = len(labels)
    if n < k:
        with pytest.raises(ValueError):
            iid_partition(labels, k, seed)
        return
    shards = iid_partition(labels, k, seed)
    assert len(shards) == k
    joined = np.concatenate(shards)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    hists = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    assert (hists.max(axis=0) - hists.min(axis=0) <= 1).all()  # stratified: classes spread evenly


def test_iid_is_deterministic_in_the_seed():
    y = np.arange(100) % 3
    a, b, c = iid_partition(y, 4, 7), iid_partition(y, 4, 7), iid_partition(y, 4, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_keeps_class_balance_on_digits():
    from gossipfl.learning.digits import DigitsTask

    data = DigitsTask().load_data(2026)
    shards = iid_partition(data.train.y, 8, 2026)
    for s in shards:
        hist = np.bincount(data.train.y[s], minlength=10)
        assert hist.min() >= 17 and hist.max() <= 19  # 143-146 per class over 8 shards


def test_digits_split_is_fixed_by_data_seed():
    from gossipfl.learning.digits import DigitsTask

    a, b = DigitsTask().load_data(1), DigitsTask().load_data(1)
    assert np.array_equal(a.test.y, b.test.y) and len(a.train) == 1437 and len(a.test) == 360
    assert not np.array_equal(DigitsTask().load_data(2).test.x, a.test.x)

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossipfl.learning.partition import (
    class_histogram,
    dirichlet_partition,
    iid_partition,
    label_skew,
    parse_scheme,
    partition,
    shards_partition,
)


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
    from gossipfl.learning.tasks.digits import DigitsTask

    data = DigitsTask().load_data(2026)
    shards = iid_partition(data.train.y, 8, 2026)
    for s in shards:
        hist = np.bincount(data.train.y[s], minlength=10)
        assert hist.min() >= 17 and hist.max() <= 19  # 143-146 per class over 8 shards


def test_digits_split_is_fixed_by_data_seed():
    from gossipfl.learning.tasks.digits import DigitsTask

    a, b = DigitsTask().load_data(1), DigitsTask().load_data(1)
    assert np.array_equal(a.test.y, b.test.y) and len(a.train) == 1437 and len(a.test) == 360
    assert not np.array_equal(DigitsTask().load_data(2).test.x, a.test.x)


def test_the_validation_hold_out_is_fixed_stratified_and_never_the_test_split():
    from gossipfl.learning.task import with_validation
    from gossipfl.learning.tasks.digits import DigitsTask

    data = DigitsTask().load_data(2026)
    held = with_validation(data, 2026)
    assert held.test is not data.test and len(held.train) + len(held.test) == len(data.train)
    assert len(held.test) == math.ceil(0.2 * len(data.train))  # as scikit-learn rounds it
    rows = {r.tobytes() for r in data.train.x}
    assert all(r.tobytes() in rows for r in held.test.x)  # carved from the training split only
    val = {r.tobytes() for r in held.test.x}
    assert not any(r.tobytes() in val for r in held.train.x)  # disjoint from what nodes train on
    # stratified: each class's share of the hold-out within one image of its share of the training split
    expected = np.bincount(data.train.y, minlength=10) * len(held.test) / len(data.train)
    assert np.abs(np.bincount(held.test.y, minlength=10) - expected).max() <= 1
    again = with_validation(DigitsTask().load_data(2026), 2026)
    assert np.array_equal(again.test.x, held.test.x)  # every node carves the same rows
    assert not np.array_equal(with_validation(data, 7).test.x, held.test.x)


# --- non-IID schemes: dirichlet, shards, the scheme string, skew ---------------------------------------------

SCHEMES = ["iid", "dirichlet:100", "dirichlet:0.5", "dirichlet:0.1", "shards:1", "shards:3"]


def _digits_y():
    from gossipfl.learning.tasks.digits import DigitsTask

    return DigitsTask().load_data(2026).train.y


def _assert_exact_cover(shards, n, k):
    assert len(shards) == k
    joined = np.concatenate(shards) if shards else np.empty(0, dtype=int)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(np.array_equal(s, np.sort(s)) for s in shards)


@given(
    labels=st.lists(st.integers(0, 9), min_size=0, max_size=1500),
    k=st.integers(1, 32),
    alpha=st.floats(0.01, 1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_every_sample_exactly_once(labels, k, alpha, seed):
    labels = np.array(labels, dtype=np.int64)
    _assert_exact_cover(dirichlet_partition(labels, k, alpha, seed, min_size=0), len(labels), k)
    try:
        shards = dirichlet_partition(labels, k, alpha, seed)
    except ValueError as e:  # only an infeasible or unlucky setting, with a message that says so
        assert len(labels) < k or "fewer than 1 samples after 100 draws" in str(e)
        return
    _assert_exact_cover(shards, len(labels), k)
    assert min(len(s) for s in shards) >= 1


@given(
    labels=st.lists(st.integers(0, 9), min_size=0, max_size=1500),
    k=st.integers(1, 32),
    s=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_cover_every_sample_exactly_once_with_near_equal_sizes(labels, k, s, seed):
    labels = np.array(labels, dtype=np.int64)
    if len(labels) < k * s:
        with pytest.raises(ValueError, match="cannot be cut into"):
            shards_partition(labels, k, s, seed)
        return
    shards = shards_partition(labels, k, s, seed)
    _assert_exact_cover(shards, len(labels), k)
    sizes = [len(x) for x in shards]
    assert max(sizes) - min(sizes) <= s  # each of the s pieces differs by at most one


@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=1500),
    k=st.integers(1, 16),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_dispatches_to_the_scheme(labels, k, scheme, seed):
    labels = np.array(labels, dtype=np.int64)
    name, arg = parse_scheme(scheme)
    direct = {
        "iid": lambda: iid_partition(labels, k, seed),
        "dirichlet": lambda: dirichlet_partition(labels, k, arg, seed),
        "shards": lambda: shards_partition(labels, k, arg, seed),
    }[name]
    try:
        expected = direct()
    except ValueError:
        with pytest.raises(ValueError):
            partition(labels, k, scheme, seed)
        return
    got = partition(labels, k, scheme, seed)
    _assert_exact_cover(got, len(labels), k)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_deterministic_in_the_seed(scheme):
    y = _digits_y()
    a, b, c = (partition(y, 16, scheme, seed) for seed in (7, 7, 8))
    _assert_exact_cover(a, len(y), 16)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_dirichlet_skew_falls_as_alpha_grows():
    y = _digits_y()
    skew = {s: label_skew(y, partition(y, 16, s, 2026), 10) for s in SCHEMES[:4]}
    assert skew["dirichlet:0.1"] > skew["dirichlet:0.5"] > skew["dirichlet:100"] > skew["iid"]
    assert skew["iid"] < 0.02 and skew["dirichlet:100"] < 0.1 and skew["dirichlet:0.1"] > 0.5


def test_dirichlet_respects_min_size():
    y = _digits_y()
    for seed in range(5):
        assert min(len(s) for s in dirichlet_partition(y, 16, 0.1, seed, min_size=20)) >= 20


def test_dirichlet_impossible_settings_raise_with_a_clear_message():
    y = _digits_y()
    msg = "dirichlet:0.01 over 64 nodes left a node with fewer than 1 samples after 100 draws; raise ALPHA"
    with pytest.raises(ValueError, match=msg):
        dirichlet_partition(y, 64, 0.01, 2026)
    with pytest.raises(ValueError, match="1437 samples cannot give each of 16 nodes at least 100"):
        dirichlet_partition(y, 16, 100.0, 2026, min_size=100)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        dirichlet_partition(y, 16, 0.0, 2026)


def test_shards_give_each_node_few_classes_on_digits():
    y = _digits_y()
    shards = partition(y, 16, "shards:2", 2026)
    classes = [len(np.unique(y[s])) for s in shards]
    assert max(classes) <= 4 and sum(c <= 3 for c in classes) >= 12
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2
    assert label_skew(y, shards, 10) > label_skew(y, partition(y, 16, "dirichlet:0.5", 2026), 10)


def test_class_histogram_and_label_skew():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert class_histogram(y, np.array([0, 2, 3]), 4) == [1, 2, 0, 0]
    assert label_skew(y, [np.array([0, 2, 4]), np.array([1, 3, 5])], 3) == 0.0
    assert label_skew(y, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])], 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        class_histogram(y, np.arange(6), 2)


def test_parse_scheme_accepts_the_documented_forms():
    assert parse_scheme("iid") == ("iid", None)
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
    assert parse_scheme("shards:2") == ("shards", 2)


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("", "unknown scheme"),
        ("dirichlet", "ALPHA must be a positive number"),
        ("dirichlet:0", "ALPHA must be a positive number"),
        ("dirichlet:-1", "ALPHA must be a positive number"),
        ("dirichlet:x", "ALPHA must be a positive number"),
        ("dirichlet:nan", "ALPHA must be a positive number"),
        ("shards:0", "S must be a positive integer"),
        ("shards:1.5", "S must be a positive integer"),
        ("iid:2", "iid takes no parameter"),
        ("random", "unknown scheme"),
    ],
)
def test_bad_scheme_strings_are_rejected_with_a_one_line_message(bad, problem):
    for call in (lambda: parse_scheme(bad), lambda: partition(np.arange(10) % 2, 2, bad, 0)):
        with pytest.raises(ValueError) as e:
            call()
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"partition scheme {bad!r}: {problem}")
        assert text.endswith("(expected iid, dirichlet:ALPHA or shards:S)")

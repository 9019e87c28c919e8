"""The exchange counters' duration summary in /v1/status."""

from gossipfl.protocol.stats import ExchangeStats


def test_duration_percentiles_are_nearest_rank_of_the_last_hundred():
    s = ExchangeStats()
    assert s.as_dict()["p50_duration_s"] is None and s.as_dict()["p99_duration_s"] is None
    s.durations.extend(float(i) for i in range(1000, 1100))  # dropped: the deque keeps the last 100
    s.durations.extend(float(i) for i in range(100, 0, -1))  # 100 .. 1, in reverse
    d = s.as_dict()
    assert (d["p50_duration_s"], d["p99_duration_s"], d["mean_duration_s"]) == (50.0, 99.0, 50.5)
    s.durations.clear()
    s.durations.append(3.0)
    assert s.as_dict()["p50_duration_s"] == s.as_dict()["p99_duration_s"] == 3.0

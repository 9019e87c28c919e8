"""GET /v1/history: the evaluations and the last exchanges of a node, read incrementally (what the dashboard
polls), and the pure pieces under it (Timeline, relative_distance)."""

from __future__ import annotations

import numpy as np
import pytest

from gossipfl.common.timeline import Timeline
from gossipfl.protocol.consensus import SAMPLE_VALUES, relative_distance

from .helpers import running, wait_for

pytestmark = pytest.mark.timeout(60)


def test_timeline_keeps_the_last_records_or_thins_the_old_ones():
    last = Timeline(8)
    for i in range(20):
        last.add({"i": i})
    assert [r["i"] for r in last.after()] == list(range(12, 20))
    assert [r["seq"] for r in last.after(18)] == [19, 20]  # seq counts from 1, over everything added

    thin = Timeline(8, thin=True)
    for i in range(100):
        thin.add({"i": i})
    kept = [r["i"] for r in thin.after()]
    assert len(kept) <= 8 and kept[0] == 0 and kept[-1] == 99  # the whole run, start to end
    assert kept == sorted(kept) and kept[-2] == 98  # the recent ones in full detail
    with pytest.raises(ValueError):
        Timeline(3)


def test_relative_distance_exact_small_and_estimated_large():
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(30, 20)).astype(np.float32), "n": np.arange(5)}  # ints are not compared
    b = {"w": a["w"] * 1.5, "n": np.arange(5) + 100}
    assert relative_distance(a, b) == pytest.approx(0.5, rel=1e-6)
    assert relative_distance(a, a) == 0.0
    assert relative_distance({"w": np.zeros(4, np.float32)}, {"w": np.ones(4, np.float32)}) is None
    big = {"w": rng.normal(size=4 * SAMPLE_VALUES).astype(np.float32)}
    other = {"w": big["w"] + rng.normal(size=big["w"].size).astype(np.float32) * 0.1}
    assert relative_distance(big, other) == pytest.approx(0.1, rel=0.02)  # estimated on a quarter of the values


async def test_history_lists_evaluations_and_both_sides_of_exchanges(make_config, http):
    async with running(make_config(id="hist-a", eval_interval=0.2)) as (a,):
        async with running(make_config(id="hist-b", eval_interval=0.2, seeds=(f"127.0.0.1:{a.port}",))) as (b,):
            assert await wait_for(lambda: b.gossiper.stats.ok >= 3 and len(a.evals) >= 2, 20)
            async with http.get(b.url + "/v1/history") as r:
                assert r.status == 200
                doc = await r.json()
            async with http.get(a.url + "/v1/history") as r:
                answered = await r.json()
            last_eval, last_exchange = doc["evals"][-1]["seq"], doc["exchanges"][-1]["seq"]
            async with http.get(b.url + f"/v1/history?evals_after={last_eval}&exchanges_after={last_exchange}") as r:
                later = await r.json()
            async with http.get(b.url + "/v1/history?evals_after=x") as r:
                assert r.status == 400 and "integers" in (await r.json())["error"]
    assert doc["id"] == "hist-b" and doc["now"] > 1e9
    ev = doc["evals"][-1]
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["loss"] > 0 and ev["age"] >= 0 and ev["epsilon"] is None
    ok = [x for x in doc["exchanges"] if x["result"] == "ok"]
    assert len(ok) >= 3
    x = ok[-1]
    assert x["peer"] == "hist-a" and x["role"] == "initiated" and x["duration_s"] > 0
    assert x["bytes_sent"] > 1000 and x["bytes_received"] > 1000
    assert x["distance"] is not None and 0 <= x["distance"] < 1  # same init, a few steps apart
    served = [x for x in answered["exchanges"] if x["role"] == "answered" and x["result"] == "ok"]
    assert served and served[-1]["peer"] == "hist-b" and served[-1]["bytes_received"] > 1000
    assert served[-1]["distance"] is not None
    # incremental: only what came after
    assert all(e["seq"] > last_eval for e in later["evals"])
    assert all(e["seq"] > last_exchange for e in later["exchanges"])

"""GET /v1/history: the evaluations and the last exchanges of a node, read incrementally (what the dashboard
polls), and the pure pieces under it (Timeline, relative_distance)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from gossipfl.common.timeline import Timeline
from gossipfl.protocol import wire
from gossipfl.protocol.consensus import SAMPLE_VALUES, relative_distance

from .helpers import message, params_of, running, wait_for

pytestmark = pytest.mark.timeout(60)


def test_timeline_keeps_the_last_records_or_thins_the_old_ones():
    last = Timeline(8)
    for i in range(20):
        last.add({"i": i})
    assert [r["i"] for r in last.after()] == list(range(12, 20))
    assert [r["seq"] for r in last.after(18)] == [19, 20]  # seq counts from 1, over everything added

    thin = Timeline(8, thin=True)
    for i in range(9):
        thin.add({"i": i})
    assert [r["i"] for r in thin.after()] == [0, 2, 4, 5, 6, 7, 8]  # full: every second of the older half went
    for i in range(9, 100):
        thin.add({"i": i})
        assert len(thin) <= 8
    kept = [r["i"] for r in thin.after()]
    assert len(kept) <= 8 and kept[0] == 0 and kept[-1] == 99  # the whole run, start to end
    assert kept == sorted(kept) and kept[-2] == 98  # the recent ones in full detail
    with pytest.raises(ValueError, match="at least 4"):
        Timeline(3)
    assert len(Timeline(4)) == 0


def test_relative_distance_exact_small_and_estimated_large():
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(30, 20)).astype(np.float32), "n": np.arange(5)}  # ints are not compared
    b = {"w": a["w"] * 1.5, "n": np.arange(5) + 100}
    assert relative_distance(a, b) == pytest.approx(0.5, rel=1e-6)
    assert relative_distance(a, a) == 0.0
    c = {"w": rng.normal(size=(30, 20)).astype(np.float32), "v": rng.normal(size=7), "n": np.arange(5.0)}
    d = {"w": rng.normal(size=(30, 20)).astype(np.float32), "v": rng.normal(size=7), "n": np.arange(5)}
    squares = sum(np.sum((c[k].astype(float) - d[k]) ** 2) for k in "wv")
    exact = np.sqrt(squares / sum(np.sum(c[k].astype(float) ** 2) for k in "wv"))
    assert relative_distance(c, d) == pytest.approx(exact, rel=1e-12)  # every float tensor both name, no int one
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
    x = [x for x in ok if x["role"] == "initiated"][-1]  # (a learns b from its prepares and initiates too)
    assert x["peer"] == "hist-a" and x["duration_s"] > 0
    assert x["bytes_sent"] > 1000 and x["bytes_received"] > 1000
    assert x["distance"] is not None and 0 <= x["distance"] < 1  # same init, a few steps apart
    served = [x for x in answered["exchanges"] if x["role"] == "answered" and x["result"] == "ok"]
    assert served and served[-1]["peer"] == "hist-b" and served[-1]["bytes_received"] > 1000
    assert served[-1]["distance"] is not None
    # incremental: only what came after
    assert all(e["seq"] > last_eval for e in later["evals"])
    assert all(e["seq"] > last_exchange for e in later["exchanges"])


def _strict(body: str) -> dict:
    """JSON as a browser reads it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


async def test_a_diverged_model_still_gives_valid_json(make_config, http):
    """A peer's model of finite but huge weights makes the loss NaN: status and history say null."""
    async with running(make_config(id="victim", no_train=True, eval_interval=0.2)) as (n,):
        huge = {k: np.full_like(v, 3e37) if v.dtype.kind == "f" else v for k, v in params_of(n).items()}
        xid = wire.new_xid()
        async with http.post(n.url + "/v1/gossip", data=message(n, huge, sender="mallory", xid=xid)) as r:
            assert r.status == 200
        async with http.post(n.url + f"/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == "committed"
        assert await wait_for(lambda: n.last_eval is not None and not np.isfinite(n.last_eval.loss), 10)
        docs = {}
        for path in ("/v1/status", "/v1/history"):
            async with http.get(n.url + path) as r:
                docs[path] = _strict(await r.text())
    assert docs["/v1/status"]["metrics"]["loss"] is None
    assert docs["/v1/history"]["evals"][-1]["loss"] is None


async def test_an_expired_exchange_is_recorded_at_its_expiry(make_config, http):
    async with running(make_config(id="ex", no_train=True)) as (n,):
        n.gossiper.ledger.prepare_ttl = 0.5
        t0 = time.time()
        async with http.post(n.url + "/v1/gossip", data=message(n, sender="ghost")) as r:
            assert r.status == 200
        await asyncio.sleep(2.0)  # no decision comes; the next prepare notices the expiry
        async with http.post(n.url + "/v1/gossip", data=b"junk") as r:
            assert r.status == 400
        async with http.get(n.url + "/v1/history") as r:
            records = (await r.json())["exchanges"]
    expired = [x for x in records if x["result"] == "expired"]
    assert len(expired) == 1 and expired[0]["peer"] == "ghost"
    assert expired[0]["duration_s"] == pytest.approx(0.5, abs=0.2)
    assert expired[0]["t"] - t0 == pytest.approx(0.5, abs=0.3)  # when it expired, not when it was noticed
    rejected = [x for x in records if x["result"] == "rejected"]
    assert rejected and rejected[-1]["bytes_received"] == 4 and rejected[-1]["error"]

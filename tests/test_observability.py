"""/metrics (Prometheus text and OpenMetrics, parsed by prometheus_client's own parsers, names checked
against the Prometheus conventions) and /v1/openapi.json (every served route is described)."""

from __future__ import annotations

import re

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gossipfl.serving.ports import NODE_KEY

from .helpers import running, wait_for

pytestmark = pytest.mark.timeout(60)

REQUIRED = {  # family name (as the parser reports it) -> type
    "gossipfl_exchanges": "counter",
    "gossipfl_exchange_duration_seconds": "histogram",
    "gossipfl_gossip_sent_bytes": "counter",
    "gossipfl_gossip_received_bytes": "counter",
    "gossipfl_known_peers": "gauge",
    "gossipfl_model_age_steps": "gauge",
    "gossipfl_served_model_age_steps": "gauge",
    "gossipfl_test_accuracy_ratio": "gauge",
    "gossipfl_test_loss": "gauge",
    "gossipfl_train_steps": "counter",
    "gossipfl_inference_requests": "counter",
    "gossipfl_inference_duration_seconds": "histogram",
    "gossipfl_build": "info",
}
NAME = re.compile(r"^gossipfl_[a-z][a-z0-9_]*$")


async def test_metrics_parse_and_follow_the_conventions(make_config, http):
    async with running(make_config()) as (a,):
        async with running(make_config(seeds=(f"127.0.0.1:{a.port}",))) as (b,):
            assert await wait_for(lambda: b.gossiper.stats.ok >= 2 and a.last_eval is not None, 20)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
            async with http.post(b.url + "/v2/models/digits/infer", json=body) as r:
                assert r.status == 200
            async with http.post(b.url + "/v2/models/nope/infer", json=body) as r:
                assert r.status == 404
            async with http.get(b.url + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
            async with http.get(b.url + "/metrics", headers={"Accept": "application/openmetrics-text"}) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                openmetrics = await r.text()

    families = {f.name: f for f in parse_text(text)}
    strict = {f.name: f for f in parse_openmetrics(openmetrics)}  # raises on any malformed line
    for name, kind in REQUIRED.items():
        assert strict[name].type == kind, name
        assert name in families or f"{name}_info" in families
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert NAME.match(name), name
            if kind == "counter":
                assert name.endswith("_total"), name
    assert not any(re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", n) for n in families)  # base units only

    def value(family: str, **labels: str) -> float:
        return sum(
            s.value
            for s in strict[family].samples
            if all(s.labels.get(k) == v for k, v in labels.items()) and s.name in (family, f"{family}_total")
        )

    assert value("gossipfl_exchanges", role="initiator", result="ok") >= 2
    assert value("gossipfl_gossip_sent_bytes") > 0 and value("gossipfl_train_steps") > 0
    assert value("gossipfl_known_peers") == 1
    assert 0 <= value("gossipfl_test_accuracy_ratio") <= 1
    assert value("gossipfl_inference_requests", model="digits", code="200") == 1
    # requests for an unknown model are not counted: their name would be a label anyone could inflate
    assert not [s for s in strict["gossipfl_inference_requests"].samples if s.labels.get("code") == "404"]
    count = [s for s in strict["gossipfl_exchange_duration_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in count if s.labels["result"] == "ok") >= 2
    build = strict["gossipfl_build"].samples[0]
    assert build.labels["task"] == "digits" and build.labels["version"]


async def test_openapi_describes_every_served_route(make_config, http):
    async with running(make_config(no_train=True)) as (node,):
        async with http.get(node.url + "/v1/openapi.json") as r:
            assert r.status == 200
            doc = await r.json()
        app = node._runner.app
        assert app[NODE_KEY] is node
        served = {
            (route.method.lower(), route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD"  # aiohttp adds HEAD for every GET
        }
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served == described
    assert doc["openapi"].startswith("3.") and "Error" in doc["components"]["schemas"]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "gossipfl_signature", "mutual_tls"}
    for path, ops in doc["paths"].items():  # who may call what (serving/auth.py): health open, gossip members only
        for op in ops.values():
            if path.startswith(("/v2/health/", "/static/")) or path == "/":  # and the dashboard's page
                assert op["security"] == [] and "401" not in op["responses"], path
            elif path.startswith(("/v1/gossip", "/v1/group")):  # and secure group rounds
                assert {next(iter(s)) for s in op["security"]} == {"gossipfl_signature", "mutual_tls"}, path
            else:
                assert {"bearer": []} in op["security"] and "401" in op["responses"], path
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = {c for c in op["responses"] if c.startswith("4")}
            for code in codes:
                assert op["responses"][code] == {"$ref": "#/components/responses/Error"}, (method, path, code)

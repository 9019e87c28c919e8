"""The network view (gossipfl/monitor): a collector reading real nodes on loopback (their curves, exchanges
and consensus distance; hung, refusing and hostile nodes), its page in a real browser (tests/browser.py:
skipped without Chromium), ``gossipfl dashboard`` as a command, and a testbed serving the same page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgpack
import numpy as np
import pytest
from aiohttp import web

from gossipfl.monitor import models
from gossipfl.monitor.app import DashboardServer, build_app
from gossipfl.monitor.collector import Collector
from gossipfl.monitor.discover import MdnsWatcher
from gossipfl.monitor.models import Model, model_of
from gossipfl.monitor.records import NodeRecord
from gossipfl.protocol import compress, wire
from gossipfl.serving.errors import dumps_finite

from .browser import browser, open_page  # noqa: F401  (browser: a fixture)
from .helpers import LOOPBACK, running, served, spread, wait_for
from .test_members import key_file  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)
EVIL = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[str]:
    """An address that accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(never, LOOPBACK, 0)
    try:
        yield f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


def refused_url() -> str:
    """An address nobody listens on (a port just freed)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return f"http://{LOOPBACK}:{s.getsockname()[1]}"


@contextlib.asynccontextmanager
async def fake_node(node_id: str, fail_with: str | None = None) -> AsyncIterator[str]:
    """A server that answers like a node whose id is ``node_id`` (one evaluation, one exchange with a peer of
    that name), or, with ``fail_with``, a 500 whose error is that text."""
    t0 = time.time()

    async def status(request: web.Request) -> web.Response:
        if fail_with is not None:
            return web.json_response({"error": fail_with}, status=500)
        return web.json_response({"id": node_id, "task": node_id, "age": 3, "uptime_s": time.time() - t0,
                                  "metrics": {"accuracy": 0.5, "loss": 1.0}, "peers": [{"id": node_id}],
                                  "exchanges": {"ok": 1}, "upload": {"rate_bytes_per_s": 10.0}})  # fmt: skip

    async def history(request: web.Request) -> web.Response:
        ev = [{"seq": 1, "t": t0, "accuracy": 0.25}, {"seq": 2, "t": t0 + 1, "accuracy": 0.5}]
        ex = [{"seq": 3, "t": time.time(), "peer": node_id, "role": "initiated", "result": "ok"}]
        return web.json_response({"id": node_id, "now": time.time(), "evals": ev, "exchanges": ex})

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/history", history)
    async with served(app) as url:
        yield url


@contextlib.asynccontextmanager
async def raw_node(routes: dict[str, bytes | Callable[[], bytes]]) -> AsyncIterator[str]:
    """A server answering each path of ``routes`` with those bytes (or what the callable returns), JSON or, for
    /v1/model, msgpack: a node saying exactly what a test makes it say."""
    app = web.Application()
    for path, body in routes.items():

        async def answer(
            request: web.Request, path: str = path, body: bytes | Callable[[], bytes] = body
        ) -> web.Response:
            kind = "application/msgpack" if path == "/v1/model" else "application/json"
            return web.Response(body=body() if callable(body) else body, content_type=kind)

        app.router.add_get(path, answer)
    async with served(app) as url:
        yield url


def status_of(node_id: str, **fields: object) -> bytes:
    """A node's /v1/status, with ``fields`` replaced."""
    doc = {"id": node_id, "task": "t", "age": 1, "uptime_s": 10.0, "metrics": {"accuracy": 0.5, "loss": 1.0},
           "peers": [], "exchanges": {"ok": 1}, "upload": {"rate_bytes_per_s": 1.0}}  # fmt: skip
    return json.dumps({**doc, **fields}).encode()


def history_of(*evals: tuple[float, float], now: float | None = None, **fields: object) -> bytes:
    """A node's /v1/history: ``evals`` as (t, accuracy), numbered from 1; ``now`` the node's clock."""
    rows = [{"seq": i + 1, "t": t, "accuracy": a} for i, (t, a) in enumerate(evals)]
    return json.dumps({"now": time.time() if now is None else now, "evals": rows, "exchanges": [], **fields}).encode()


def message_of(params: dict[str, np.ndarray], **message: object) -> bytes:
    """A /v1/model body (a gossip message) holding ``params``."""
    return wire.encode(wire.GossipMessage("fake", 1, params, **message)).tobytes()  # type: ignore[arg-type]


class Fixed:
    """A collector whose document is given: what the page gets, whatever a collector could make."""

    version = 1

    def __init__(self, doc: dict) -> None:
        self.doc = doc

    def document(self) -> dict:
        return self.doc


@contextlib.asynccontextmanager
async def serve_view(collector: object) -> AsyncIterator[str]:
    """The network view's app (page and /api/network) of ``collector`` on loopback, nothing sampled."""
    runner = web.AppRunner(build_app(collector))  # type: ignore[arg-type]
    await runner.setup()
    sock = socket.create_server((LOOPBACK, 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://{LOOPBACK}:{sock.getsockname()[1]}/"
    finally:
        await runner.cleanup()


async def get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(content_type=None)


async def test_the_collector_reads_curves_exchanges_and_consensus(make_config, http):
    a = make_config(id="mon-a", eval_interval=0.3)
    async with running(a) as (na,):
        seeds = (f"{LOOPBACK}:{na.port}",)
        others = [make_config(id=f"mon-{x}", eval_interval=0.3, seeds=seeds) for x in "bc"]
        async with running(*others) as rest:
            nodes = [na, *rest]
            assert await wait_for(lambda: all(n.gossiper.stats.ok >= 2 for n in rest), 30)
            collector = Collector([n.url for n in nodes], interval=0.5)
            try:
                sizes = []
                for _ in range(4):
                    await collector.sample()
                    sizes.append(len(collector.document()["consensus"]))
                    await asyncio.sleep(0.5)
                doc = collector.document()
            finally:
                await collector.stop()
            assert sizes == [1, 2, 3, 4]  # one consensus distance per sample, once two models are read
            assert all(d > 0 and 0 < r < 1 for _, d, r in doc["consensus"])
            by_id = {row["id"]: row for row in doc["nodes"]}
            assert sorted(by_id) == ["mon-a", "mon-b", "mon-c"]
            for n in nodes:
                row, record = by_id[n.id], collector.nodes[n.url]
                assert row["url"] == n.url and row["reachable"] is True and row["error"] is None
                async with http.get(f"{n.url}/v1/history") as r:
                    history = await r.json()
                read = [e for e in history["evals"] if e["seq"] <= record.evals_after]
                assert len(read) >= 3
                assert [a for _, a in row["series"]] == [e["accuracy"] for e in read]  # every point, in order
                assert all(abs(t - e["t"]) < 1.0 for (t, _), e in zip(row["series"], read, strict=True))  # one clock
                assert row["accuracy"] is not None and row["peers"] >= 1 and row["exchanges_ok"] is not None
            started = [(n, x) for n in nodes for x in n.gossiper.stats.recent.after(0) if x["role"] == "initiated"]
            read = [  # the exchanges each node started and committed, as far as the collector read
                (n.id, x["peer"])
                for n, x in started
                if x["result"] == "ok" and x["seq"] <= collector.nodes[n.url].exchanges_after
            ]
            ok, counted = {tuple(sorted(pair)) for pair in read}, len(read)
            assert {(e["a"], e["b"]) for e in doc["edges"]} == ok and ok
            assert sum(e["count"] for e in doc["edges"]) == counted  # each exchange once, both directions merged


async def test_the_consensus_distance_is_that_of_the_nodes_models(make_config):
    """Nodes that do not train or gossip keep their (different) initial models: the collector's distance,
    from /v1/model, is the one computed from the nodes' own parameters."""
    configs = [make_config(no_train=True, seed=s, gossip_interval=3600.0) for s in (1, 2, 3)]
    async with running(*configs) as nodes:
        collector = Collector([n.url for n in nodes], interval=1)
        try:
            await collector.sample()
        finally:
            await collector.stop()
        ((_, distance, relative),) = collector.document()["consensus"]
        assert distance == pytest.approx(spread(nodes), rel=1e-9) and distance > 0
        model = model_of((await nodes[0].model_payload()).tobytes())
        assert model.size == sum(np.asarray(p).size for p in nodes[0].learner.snapshot().params.values())
        assert 0 < relative < distance / np.linalg.norm(np.concatenate(model.parts)) * 10


async def test_large_models_are_read_less_often(make_config, monkeypatch):
    """Each node sends its model to the view at most at MODEL_READ_RATE on average: a model of S bytes every
    S / rate seconds (or every interval, for a small one)."""
    from gossipfl.monitor import collector as module

    async with running(*[make_config(no_train=True, seed=s, gossip_interval=3600.0) for s in (1, 2)]) as nodes:
        for rate, expected in ((1e12, 3), (1e3, 1)):  # digits: ~20 kB, every sample / once in ~20 s
            monkeypatch.setattr(module, "MODEL_READ_RATE", rate)
            collector = Collector([n.url for n in nodes], interval=0.2)
            try:
                for _ in range(3):
                    await collector.sample()
                    await asyncio.sleep(0.2)  # (the interval, as the collector's own loop waits)
            finally:
                await collector.stop()
            assert len(collector.document()["consensus"]) == expected, rate


async def test_a_hung_or_refusing_node_is_shown_unreachable_and_holds_nothing_up(make_config):
    async with hung_server() as hung, running(make_config(eval_interval=0.3)) as (node,):
        refused = refused_url()
        collector = Collector([hung, refused, node.url], interval=1.0, timeout=1.0)
        try:
            started = time.monotonic()
            await collector.sample()
            took = time.monotonic() - started
            rows = {r["url"]: r for r in collector.document()["nodes"]}
            assert took < 1.5, took  # the hung node costs the timeout, no more
            assert rows[hung]["reachable"] is False and rows[hung]["error"] == "no answer within 1 s"
            assert rows[refused]["reachable"] is False and rows[refused]["error"].startswith("cannot connect")
            assert rows[node.url]["reachable"] is True and rows[node.url]["id"] == node.id
            first = len(rows[node.url]["series"])
            await collector.start()  # in the background: every interval, whatever the hung node does
            await asyncio.sleep(3.6)
            doc = collector.document()
        finally:
            await collector.stop()
        assert doc["samples"] >= 4
        rows = {r["url"]: r for r in doc["nodes"]}
        assert rows[node.url]["seen_s_ago"] < 1.6 and len(rows[node.url]["series"]) > first
        assert rows[hung]["reachable"] is False and rows[hung]["id"] is None


async def test_the_read_token_is_sent_to_the_nodes(make_config, key_file):  # noqa: F811
    token = "monitor-t0ken"
    async with running(*(make_config(secret_file=key_file, read_token=token) for _ in range(2))) as nodes:
        without = Collector([n.url for n in nodes], interval=1)
        with_token = Collector([n.url for n in nodes], interval=1, token=token)
        try:
            await without.sample()
            await with_token.sample()
        finally:
            await without.stop()
            await with_token.stop()
        refused = without.document()
        errors = {n["error"] for n in refused["nodes"]}
        assert len(errors) == 1 and errors.pop().startswith("HTTP 401: unauthorized: a read token is required")
        assert refused["consensus"] == []
        read = with_token.document()
        assert all(n["reachable"] for n in read["nodes"]) and len(read["consensus"]) == 1  # models read too
        assert token not in json.dumps(read)


def test_a_restarted_node_is_read_from_its_new_start():
    """Sequence numbers start again when a node restarts: a new boot id in its history (or, from a node that
    sends none, its uptime falling). The answer that shows it was asked for with the old cursors, so the
    next read asks from 0 and gets the whole new run; another node at the same address starts a new curve."""
    record = NodeRecord("http://127.0.0.1:1")

    def read(node_id: str, uptime: float, boot: str | None, accuracies: list[float], now: float) -> None:
        """A node of that boot whose evaluations so far are ``accuracies`` answers the record's cursor."""
        evals = [{"seq": s, "t": now - 1, "accuracy": a} for s, a in enumerate(accuracies, 1) if s > record.evals_after]
        history = {"now": now, "evals": evals, "exchanges": [], **({"boot": boot} if boot else {})}
        record.take({"id": node_id, "uptime_s": uptime}, history, now)

    def drawn() -> list[float]:
        return [r["accuracy"] for r in record.series.after(0)]

    first = [0.1, 0.2, 0.3]
    read("n", 20.0, "b1", first, 100.0)
    read("n", 22.0, "b1", first, 102.0)  # nothing new
    assert drawn() == first and record.evals_after == 3
    # restarted, and read 25 s into its new run (a long interval): its uptime did not fall, its boot changed
    second = [0.01, 0.02, 0.03, 0.04, 0.05]
    read("n", 25.0, "b2", second, 130.0)  # (answered after seq 3: 0.04 and 0.05 only)
    assert record.evals_after == 0 and drawn() == first
    read("n", 27.0, "b2", second, 132.0)
    assert drawn() == first + second and record.evals_after == 5
    # a node that sends no boot id: its uptime falling says it restarted
    read("n", 1.0, None, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], 140.0)
    assert record.evals_after == 0
    read("n", 3.0, None, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], 142.0)
    assert drawn() == first + second + [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    read("other", 500.0, "b9", [0.7, 0.75], 150.0)  # another node at this address: a new curve, from 0
    read("other", 502.0, "b9", [0.7, 0.75], 152.0)
    assert drawn() == [0.7, 0.75] and record.id == "other"
    with pytest.raises(ValueError, match="no id"):
        record.take({"id": 3}, {"now": 160.0}, 160.0)


async def test_mdns_watching_adds_nodes_as_they_appear(make_config, cluster):
    collector = Collector(interval=1)
    watcher = MdnsWatcher(collector, [LOOPBACK], cluster=cluster)
    await watcher.start()
    try:
        assert collector.nodes == {}
        other = make_config(discovery=("mdns",), cluster=cluster + "-other")
        async with running(make_config(discovery=("mdns",)), other) as (node, stranger):
            assert await wait_for(lambda: node.url in collector.nodes, 15)
            await asyncio.sleep(1.0)
            assert list(collector.nodes) == [node.url]  # not the other cluster's node
    finally:
        await watcher.stop()
        await collector.stop()


async def test_the_server_answers_loopback_names_only(make_config, http):
    async with running(make_config(no_train=True)) as (node,):
        async with DashboardServer(Collector([node.url], interval=0.5), port=0) as server:
            assert await wait_for(lambda: server.collector.samples >= 1, 5)
            async with http.get(server.url + "api/network") as r:
                assert r.status == 200 and (await r.json())["nodes"][0]["id"] == node.id
            async with http.get(server.url, headers={"Host": "attacker.example:80"}) as r:
                assert r.status == 421  # a page elsewhere, through a DNS name pointed at 127.0.0.1
            async with http.get(server.url.replace(LOOPBACK, "localhost")) as r:
                assert r.status == 200


async def test_network_page_draws_every_node_live_and_shows_hostile_strings_as_text(browser, make_config, http):  # noqa: F811
    a = make_config(id="page-a", eval_interval=0.3)
    async with running(a) as (na,):
        b = make_config(id="page-b", eval_interval=0.3, seeds=(f"{LOOPBACK}:{na.port}",))
        async with running(b) as (nb,), hung_server() as hung, fake_node(EVIL) as evil, fake_node("x", EVIL) as bad:
            assert await wait_for(lambda: nb.gossiper.stats.ok >= 2, 20)
            collector = Collector([na.url, nb.url, hung, evil, bad], interval=0.5, timeout=0.5)
            async with DashboardServer(collector, port=0) as server:
                w = await open_page(browser, server.url)
                await w.wait_updates(2)
                drawn = await w.js(
                    "const doc = window.gossipflDashboard.doc;"
                    "return [...document.querySelectorAll('#chart-accuracy path.series')].map(p => ["
                    "  p.dataset.series, JSON.parse(p.dataset.last), +p.dataset.n,"
                    "  doc.nodes.find(n => (n.id || n.url) === p.dataset.series).series.at(-1)])"
                )
                async with http.get(server.url + "api/network") as r:
                    served = {n["id"] or n["url"]: n for n in (await r.json())["nodes"]}
                names = sorted(name for name, *_ in drawn)
                assert names == sorted([EVIL, "page-a", "page-b"])  # a path for every node with points
                for name, last, _, last_in_doc in drawn:
                    assert last == last_in_doc and last in served[name]["series"]
                assert len(served) == 5
                await w.wait_updates(5)
                later = dict(
                    await w.js(
                        "return [...document.querySelectorAll('#chart-accuracy path.series')]"
                        ".map(p => [p.dataset.series, +p.dataset.n])"
                    )
                )
                before = {name: n for name, _, n, _ in drawn}
                assert later["page-a"] > before["page-a"] and later["page-b"] > before["page-b"]  # live
                rows = await w.js(
                    "return [...document.querySelectorAll('#nodes tbody tr')].map(r => [r.dataset.node,"
                    " r.querySelector('td.state').textContent, r.cells[0].textContent,"
                    " r.cells[0].querySelector('a') && r.cells[0].querySelector('a').getAttribute('href')])"
                )
                state = {node: (st, name, href) for node, st, name, href in rows}
                assert state[hung][0] == "unreachable no answer within 0.5 s"
                assert state[bad][0] == f"unreachable HTTP 500: {EVIL}"  # the node's error, as text
                assert state["page-a"] == ("reachable", "page-a", na.url + "/")  # a link to the node's own page
                assert state[EVIL][1] == EVIL
                dots = await w.js(
                    "return [...document.querySelectorAll('#graph circle.node-dot')]"
                    ".map(c => [c.dataset.node, c.classList.contains('unreachable')])"
                )
                assert sorted(map(tuple, dots)) == sorted(
                    [(hung, True), (bad, True), (EVIL, False), ("page-a", False), ("page-b", False)]
                )
                edges = await w.js(
                    "return [...document.querySelectorAll('#graph line.edge')].map(e => [e.dataset.a, e.dataset.b])"
                )
                assert ["page-a", "page-b"] in edges
                injected = await w.js(
                    "return [window.__xss === undefined, document.querySelectorAll('img').length,"
                    " document.querySelectorAll('script').length]"
                )
                assert injected == [True, 0, 1]  # no element made from a node's strings
                assert w.problems == []


def test_gossipfl_dashboard_command_serves_the_seed_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "GOSSIPFL_TOKEN": "not-printed-t0ken"}
    node = subprocess.Popen(
        [sys.executable, "-m", "gossipfl", "node", "--host", LOOPBACK, "--port", "0", "--id", "cli-seed",
         "--discovery", "static", "--no-train"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    dash = None
    try:
        url = _wait_line(node.stderr, "node up at", 60).split("node up at ")[1].split()[0].rstrip(":")
        dash = subprocess.Popen(
            [sys.executable, "-m", "gossipfl", "dashboard", "--seeds", url, "--port", "0", "--interval", "0.5"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        line = _wait_line(dash.stdout, "dashboard: ", 30)
        page = line.split("dashboard: ")[1].split()[0]
        assert page.startswith(f"http://{LOOPBACK}:") and page.endswith("/")
        deadline = time.monotonic() + 20
        doc: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                import urllib.request

                with urllib.request.urlopen(page + "api/network", timeout=3) as r:
                    doc = json.load(r)
                if doc["nodes"] and doc["nodes"][0]["reachable"]:
                    break
            time.sleep(0.3)
        assert [(n["id"], n["url"], n["reachable"]) for n in doc["nodes"]] == [("cli-seed", url, True)]
        dash.send_signal(signal.SIGTERM)
        out, err = dash.communicate(timeout=20)
        assert dash.returncode == 0, err
        assert "not-printed-t0ken" not in line + out + err
        assert os.listdir(tmp_path) == []  # nothing written where it ran
    finally:
        for p in (dash, node):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=20)


def _wait_line(stream, needle: str, timeout: float) -> str:
    """The first line of ``stream`` (a child's pipe) that holds ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if needle in line:
            return line
        if not line:
            break
    raise AssertionError(f"no line with {needle!r}")


def test_a_testbed_serves_the_network_view_of_its_nodes(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gossipfl", "testbed", "--mode", "inproc", "--nodes", "2", "--duration", "8",
         "--gossip-interval", "0.3", "--out", str(tmp_path / "tb"), "--dashboard-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        page = _wait_line(proc.stdout, "testbed: dashboard at ", 60).split(" at ")[1].strip()
        assert page.startswith(f"http://{LOOPBACK}:")
        import urllib.request

        with urllib.request.urlopen(page, timeout=5) as r:
            assert b"/static/network.js" in r.read()
        doc: dict = {}
        while proc.poll() is None:  # while the testbed runs
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(page + "api/network", timeout=5) as r:
                    doc = json.load(r)
            if doc and all(n["reachable"] and n["series"] for n in doc["nodes"]) and doc["consensus"]:
                break
            time.sleep(0.5)
        assert [n["id"].split("-")[0] for n in doc["nodes"]] == ["node0", "node1"]
        assert all(n["reachable"] and n["series"] for n in doc["nodes"]) and doc["consensus"]  # the testbed's own
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_running_testbed_in_the_browser(browser, tmp_path):  # noqa: F811
    """The page of a testbed run as users run it (process mode, the forking launcher): no console error, a
    curve per node whose points are what the nodes' own /v1/status and /v1/history say, growing live."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gossipfl", "testbed", "--nodes", "3", "--duration", "18", "--out", str(tmp_path / "tb"),
        "--dashboard-port", "0", cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        page = None
        while page is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "the testbed ended before printing its dashboard's address"
            if line.startswith("testbed: dashboard at "):
                page = line.split(" at ", 1)[1].split()[0]
        drain = asyncio.ensure_future(proc.stdout.read())  # (keep the pipe from filling)
        w = await open_page(browser, page)
        await w.page.wait_for_function(
            "() => document.querySelectorAll('#chart-accuracy path.series').length === 3", timeout=60000
        )
        before = dict(await w.js("return [...document.querySelectorAll('#chart-accuracy path.series')]"
                                 ".map(p => [p.dataset.series, +p.dataset.n])"))  # fmt: skip
        nodes = await w.js("return window.gossipflDashboard.doc.nodes.map(n => [n.id, n.url, n.series])")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for node_id, url, series in nodes:
                async with http.get(url + "/v1/history") as r:
                    evals = (await r.json())["evals"]
                async with http.get(url + "/v1/status") as r:
                    status = await r.json()
                accuracies = {e["accuracy"] for e in evals}
                assert status["id"] == node_id
                assert {acc for _, acc in series} <= accuracies  # every point drawn is one the node measured
                assert status["metrics"]["accuracy"] in accuracies
        updates = await w.js("return window.gossipflDashboard.updates")
        await w.wait_updates(updates + 3)
        after = dict(await w.js("return [...document.querySelectorAll('#chart-accuracy path.series')]"
                                ".map(p => [p.dataset.series, +p.dataset.n])"))  # fmt: skip
        assert all(after[k] > before[k] for k in before), (before, after)  # new points, no reload
        assert w.problems == []
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_number_too_large_for_a_float_is_absent_and_the_view_still_answers():
    """JSON integers have no bound: a node writing a 400-digit one (in any field) is shown without that value,
    and /api/network still answers everyone (it was a 500: OverflowError)."""
    big = 10**400
    fields = {"metrics": {"accuracy": big, "loss": big}, "age": big, "uptime_s": big, "exchanges": {"ok": big},
              "upload": {"rate_bytes_per_s": big}}  # fmt: skip
    evil = {
        "/v1/status": status_of("big", **fields),
        "/v1/history": history_of((big, 0.5), (time.time(), big), now=big),
    }
    honest = {"/v1/status": status_of("honest"), "/v1/history": history_of((time.time() - 1, 0.25))}
    async with raw_node(evil) as e, raw_node(honest) as h:
        async with DashboardServer(Collector([e, h], interval=0.3, models=False), port=0) as server:
            assert await wait_for(lambda: server.collector.samples >= 1, 5)
            status, doc = await get_json(server.url + "api/network")
    assert status == 200
    rows = {r["id"]: r for r in doc["nodes"]}
    assert rows["honest"]["reachable"] and rows["honest"]["accuracy"] == 0.5 and len(rows["honest"]["series"]) == 1
    big_row = rows["big"]
    assert big_row["reachable"] is True
    assert [big_row[k] for k in ("accuracy", "loss", "age", "exchanges_ok", "upload_rate")] == [None] * 5
    assert [a for _, a in big_row["series"]] == [None]  # (the point at t = 10**400 left out)


async def test_a_row_that_cannot_be_built_is_replaced_and_logged_once(caplog):
    async with (
        raw_node({"/v1/status": status_of("a"), "/v1/history": history_of()}) as a,
        raw_node({"/v1/status": status_of("b"), "/v1/history": history_of((time.time(), 0.5))}) as b,
    ):
        async with DashboardServer(Collector([a, b], interval=60, models=False), port=0) as server:
            assert await wait_for(lambda: server.collector.samples >= 1, 5)
            server.collector.nodes[a].status = None  # type: ignore[assignment]  (as a bug would leave it)
            answers = [await get_json(server.url + "api/network") for _ in range(2)]
            server.collector.document()  # (built again: /api/network answers one per sample)
    assert [status for status, _ in answers] == [200, 200]
    rows = {r["url"]: r for r in answers[1][1]["nodes"]}
    assert rows[a]["id"] == "a" and rows[a]["reachable"] is False and rows[a]["series"] == []
    assert rows[a]["error"] == "the network view cannot show what this node answered"
    assert rows[b]["reachable"] is True and len(rows[b]["series"]) == 1
    logged = [r for r in caplog.records if "cannot be shown" in r.getMessage()]
    assert len(logged) == 1 and a in logged[0].getMessage()


async def test_a_consensus_distance_that_overflows_is_left_out():
    """Two finite models so far apart that their distance overflows: no point (it was served as null, and the
    page stopped drawing); a distance measured elsewhere that is not finite is left out too."""
    far = [message_of({"w": np.array([x, 0.0])}) for x in (1e200, -1e200)]
    routes = [
        {"/v1/status": status_of(f"far{i}"), "/v1/history": history_of(), "/v1/model": m} for i, m in enumerate(far)
    ]
    async with raw_node(routes[0]) as a, raw_node(routes[1]) as b:
        collector = Collector([a, b], interval=1)
        try:
            await collector.sample()
        finally:
            await collector.stop()
    assert collector.document()["consensus"] == []
    assert all(r["reachable"] for r in collector.document()["nodes"])
    t = time.time()
    collector.add_consensus(t, math.inf, None)
    collector.add_consensus(t, math.nan, 0.5)
    collector.add_consensus(t, 2.0, math.inf)
    assert collector.document()["consensus"] == [[round(t, 3), 2.0, None]]


async def test_the_page_draws_a_document_whose_numbers_are_null(browser):  # noqa: F811
    """Every number the server may write as null (a consensus distance, a node's fields and points) shows as
    "–" and the page keeps drawing."""
    now = time.time()
    fields = ("task", "accuracy", "loss", "age", "peers", "exchanges_ok", "exchanges_answered", "upload_rate")
    node = {"id": "n", "url": "http://127.0.0.1:1", "reachable": True, "error": None, **dict.fromkeys(fields),
            "seen_s_ago": None, "series": [[now - 2, None], [now - 1, 0.5]]}  # fmt: skip
    doc = {"now": now, "interval_s": 2, "samples": 1, "nodes": [node], "edges": [], "edge_window_s": 60,
           "consensus": [[now - 2, 1.0, None], [now - 1, None, None]]}  # fmt: skip
    async with serve_view(Fixed(doc)) as url:
        w = await open_page(browser, url)
        await w.wait_updates(2)
        cards = dict(
            await w.js(
                "return [...document.querySelectorAll('#cards .card')].map(c =>"
                " [c.querySelector('.label').textContent, c.querySelector('.value').textContent +"
                " ' | ' + (c.querySelector('.note') || {textContent: ''}).textContent])"
            )
        )
        cells = await w.js("return [...document.querySelectorAll('#nodes tbody td')].map(c => c.textContent)")
        n = await w.js("return +document.querySelector('#chart-accuracy path.series').dataset.n")
    assert cards["consensus distance"] == "– | absolute –"
    assert cards["mean accuracy"].startswith("–")
    assert cells[3:8] == ["–"] * 5 and n == 1
    assert w.problems == []


def crowded(nodes: int, points: int) -> Collector:
    """A collector (never started) holding ``nodes`` nodes of ``points`` evaluations each, read as a sample
    reads them (NodeRecord.take), each node with exchanges with the next ones."""
    collector, now = Collector(interval=2.0), time.time()
    ids = [f"node{i:04d}" for i in range(nodes)]
    for i, node_id in enumerate(ids):
        url = f"http://{LOOPBACK}:{20000 + i}"
        collector.add(url)
        evals = [{"seq": k + 1, "t": now - points + k, "accuracy": k / points} for k in range(points)]
        exchanges = [{"seq": k + 1, "t": now - k, "peer": ids[(i + 1 + k) % nodes], "role": "initiated", "result": "ok"}
                     for k in range(min(5, nodes - 1))]  # fmt: skip
        collector.nodes[url].take({"id": node_id, "uptime_s": points + 10.0, "metrics": {"accuracy": 0.9}},
                                  {"now": now, "evals": evals, "exchanges": exchanges}, now)  # fmt: skip
    return collector


async def test_the_page_draws_many_nodes_of_many_points(browser):  # noqa: F811
    """250 nodes of 600 points: 150,000 points on the accuracy chart (Math.min(...points) overflowed the call
    stack above about 125,000, and the page never drew)."""
    async with serve_view(crowded(250, 600)) as url:
        w = await open_page(browser, url)
        await w.wait_updates(2, 30)
        drawn = await w.js(
            "const paths = [...document.querySelectorAll('#chart-accuracy path.series')];"
            "return [paths.length, paths.reduce((n, p) => n + +p.dataset.n, 0),"
            " document.querySelectorAll('#nodes tbody tr').length,"
            " [...document.querySelectorAll('#chart-accuracy .grid text')].length > 0]"
        )
    assert drawn == [250, 150_000, 250, True]
    assert w.problems == []


def odd_models() -> dict[str, bytes]:
    """Model messages the network view does not read, each with four values declared (as the honest ones)."""
    spec = {"w": wire.TensorSpec("<f4", (4,))}
    top_k = wire.encode(
        wire.GossipMessage("x", 1, {"w": np.array([3.0, 3.0], np.float32)}, index={"w": np.array([0, 1], np.uint32)}),
        spec=spec,
    )
    huge = {"v": 2, "sender": "x", "age": 1, "params": {"w": {"dtype": "<f4", "shape": [2**64 - 1], "data": b""}}}
    return {
        "uint8": message_of({"w": np.ones(4, np.uint8)}),  # (one byte a value, eight once widened)
        "int64": message_of({"w": np.ones(4, np.int64)}),
        "int8": wire.encode(
            wire.GossipMessage("x", 1, {"w": np.ones(4, np.float32)}), compress.for_wire("int8")
        ).tobytes(),
        "top-k": top_k.tobytes(),  # (the same declared shape as the honest models, two values)
        "huge": msgpack.packb(huge),
    }


async def test_only_uncompressed_float_models_are_read_and_the_honest_ones_are_measured():
    honest = [message_of({"w": np.full(4, x, np.float32)}) for x in (1.0, 2.0)]
    odd = odd_models()
    for body in odd.values():
        with pytest.raises(wire.WireError, match="not an uncompressed model|is not <f2|more than"):
            model_of(bytearray(body))
    bodies = [*honest, *odd.values()]
    async with contextlib.AsyncExitStack() as stack:
        urls = [
            await stack.enter_async_context(
                raw_node({"/v1/status": status_of(f"m{i}"), "/v1/history": history_of(), "/v1/model": body})
            )
            for i, body in enumerate(bodies)
        ]
        collector = Collector(urls, interval=1)
        try:
            await collector.sample()
        finally:
            await collector.stop()
    doc = collector.document()
    assert all(r["reachable"] for r in doc["nodes"]) and len(doc["nodes"]) == 7
    # the two honest models, 1 and 2 everywhere: each is 1 from their mean, whose norm is 3
    assert [(d, r) for _, d, r in doc["consensus"]] == [(1.0, pytest.approx(1 / 3))]


def test_a_model_read_is_the_body_itself():
    """A model costs its size on the wire: its tensors are views into the body read, not widened copies."""
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float16), "c": np.zeros(2)}
    body = bytearray(message_of(params))
    model = model_of(body)
    within = np.frombuffer(body, np.uint8)
    assert [p.dtype.str for p in model.parts] == ["<f4", "<f2", "<f8"]
    assert all(np.shares_memory(p, within) for p in model.parts)
    assert model.nbytes == 6 * 4 + 5 * 2 + 2 * 8 and model.size == 13
    assert np.array_equal(np.concatenate(model.parts), np.concatenate([p.ravel() for p in params.values()]))


def test_the_consensus_distance_is_exact_in_chunks_and_needs_no_copy_of_the_models(monkeypatch):
    """Models of three tensors and dtypes, 1e-6 apart relative to their norm, measured a chunk at a time
    (chunks that cross tensors): the distance of the whole vectors (np.stack, float64) to 1e-12. A one-pass
    formula (mean of the squares less the square of the mean) is off in the fourth digit here."""
    rng = np.random.default_rng(7)
    sizes, dtypes = (1500, 700, 3001), (np.float32, np.float64, np.float32)
    base = [rng.standard_normal(n) * 10 for n in sizes]
    group = [
        [(b + rng.standard_normal(b.size) * 1e-5).astype(d) for b, d in zip(base, dtypes, strict=True)]
        for _ in range(5)
    ]
    whole = np.stack([np.concatenate([p.astype(np.float64) for p in parts]) for parts in group])
    exact = float(np.sqrt(np.mean(np.sum((whole - whole.mean(axis=0)) ** 2, axis=1))))
    norm = float(np.linalg.norm(whole.mean(axis=0)))
    monkeypatch.setattr(models, "WORKING_BYTES", 1)  # the smallest chunk: 1024 values
    measured = models.consensus({str(i): Model("d", tuple(parts)) for i, parts in enumerate(group)})
    assert measured is not None and measured[2] == 5
    assert measured[0] == pytest.approx(exact, rel=1e-12) and measured[1] == pytest.approx(exact / norm, rel=1e-12)


def test_measuring_holds_a_few_megabytes_however_large_the_models():
    """Four models of 16 MiB (float32): the measure allocates its working chunks (WORKING_BYTES), not copies of
    the models (np.stack of float64 vectors held about 4.5 times the models more)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    group = {str(i): Model("d", (rng.standard_normal(4 << 20, dtype=np.float32),)) for i in range(4)}
    tracemalloc.start()
    try:
        assert models.consensus(group) is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < models.WORKING_BYTES * 1.5, peak / 2**20


async def test_a_failing_measure_is_logged_once_and_the_samples_go_on(monkeypatch, caplog):
    bodies = [message_of({"w": np.full(4, x, np.float32)}) for x in (1.0, 2.0)]
    routes = [
        {"/v1/status": status_of(f"m{i}"), "/v1/history": history_of(), "/v1/model": b} for i, b in enumerate(bodies)
    ]
    calls = []

    def failing(got: dict) -> None:
        calls.append(len(got))
        raise RuntimeError("a model not foreseen")

    monkeypatch.setattr(models, "consensus", failing)
    async with raw_node(routes[0]) as a, raw_node(routes[1]) as b:
        collector = Collector([a, b], interval=0.2)
        try:
            for _ in range(3):
                await collector.sample()
                await asyncio.sleep(0.2)  # (the interval: the models are read again)
        finally:
            await collector.stop()
    assert calls == [2, 2, 2] and collector.samples == 3
    assert all(r["reachable"] for r in collector.document()["nodes"])
    assert len([r for r in caplog.records if "could not be measured" in r.getMessage()]) == 1


async def test_many_hung_nodes_do_not_starve_a_healthy_one():
    """60 nodes that never answer hold three connections each until the timeout (status, history, model): a
    healthy node read in the same sample gets its own at once (aiohttp's default pool of 100 made it wait,
    and it was shown unreachable)."""
    async with contextlib.AsyncExitStack() as stack:
        hung = [await stack.enter_async_context(hung_server()) for _ in range(60)]
        healthy = await stack.enter_async_context(
            raw_node({"/v1/status": status_of("healthy"), "/v1/history": history_of((time.time(), 0.5))})
        )
        collector = Collector([*hung, healthy], interval=1.0, timeout=1.0)
        try:
            for _ in range(2):
                await collector.sample()
                rows = {r["url"]: r for r in collector.document()["nodes"]}
                assert rows[healthy]["reachable"] is True, rows[healthy]["error"]
                assert all(rows[u]["error"] == "no answer within 1 s" for u in hung)
        finally:
            await collector.stop()


@pytest.mark.parametrize("interval", ["nan", "inf", "0"])
def test_an_interval_that_is_not_a_positive_number_is_refused(interval, tmp_path):
    """nan read the nodes in a busy loop, inf once and never again: the collector refuses both, and
    gossipfl dashboard says so in one line (exit 2), as for its other options."""
    with pytest.raises(ValueError, match="interval must be a number of seconds > 0"):
        Collector(interval=float(interval))
    with pytest.raises(ValueError, match="timeout must be"):
        Collector(interval=1, timeout=float(interval))
    command = ["dashboard", "--seeds", refused_url(), "--port", "0", "--interval", interval]
    run = subprocess.run(
        [sys.executable, "-m", "gossipfl", *command], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "gossipfl: error: --interval must be a number of seconds > 0\n"


async def test_a_malformed_host_is_a_400_without_a_traceback(caplog):
    """An IPv6 address without brackets as Host (yarl cannot parse it) is refused as bad input, in the one
    error shape, not a 500 with a traceback; a well-formed loopback Host still reads."""

    async def ask(port: int, host: bytes) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET /api/network HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return head.split(b"\r\n", 1)[0], body

    async with DashboardServer(Collector(interval=60), port=0) as server:
        bad = [await ask(server.port, host) for host in (b"::ffff:127.0.0.1", b"::1")]
        good = await ask(server.port, b"[::1]:80")
    assert [line for line, _ in bad] == [b"HTTP/1.1 400 Bad Request"] * 2
    assert {body for _, body in bad} == {b'{"error": "malformed Host header"}'}
    assert good[0] == b"HTTP/1.1 200 OK"
    assert not [r for r in caplog.records if r.levelno >= 40]  # (nothing logged as an error: no traceback)


def test_an_mdns_interface_this_host_lacks_is_reported_as_an_mdns_error(tmp_path):
    """gossipfl dashboard --mdns-interface with an address no interface has: "mDNS on ADDRESS: ...", as a node
    says it (it said "cannot serve on 127.0.0.1:0"). Run in a network namespace of its own (unshare --net, as
    root), so no multicast reaches a real interface whatever zeroconf does."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1): a network namespace of its own")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net is not allowed here")
    command = [sys.executable, "-m", "gossipfl", "dashboard", "--mdns-interface", "10.0.0.5", "--port", "0"]
    run = subprocess.run(["unshare", "--net", *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("gossipfl: error: mDNS on 10.0.0.5: ") and run.stderr.count("\n") == 1, run.stderr


async def test_an_mdns_error_names_the_interfaces(monkeypatch):
    """Without a namespace of its own: the watcher's start as zeroconf fails it on an address this host lacks."""
    import errno

    from gossipfl.discovery.service import DiscoveryError
    from gossipfl.monitor import discover

    def missing(interfaces: object) -> None:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(discover, "make_zeroconf", missing)
    with pytest.raises(DiscoveryError, match=f"^mDNS on 10.0.0.5,10.0.0.6: {os.strerror(errno.ENODEV)}$"):
        await MdnsWatcher(Collector(interval=1), ["10.0.0.5", "10.0.0.6"]).start()


async def test_mdns_watching_says_once_when_it_watches_the_most_it_can(monkeypatch, cluster, zc, caplog):
    """Five nodes announced on loopback, the cap at three: three are watched and one warning says that the
    others are not (they were dropped without a word)."""
    from zeroconf.asyncio import AsyncServiceInfo

    from gossipfl.discovery.mdns import SERVICE_TYPE
    from gossipfl.monitor import collector as module

    monkeypatch.setattr(module, "MAX_NODES", 3)
    names = [f"{cluster}-{i}" for i in range(5)]
    ports = [int(refused_url().rsplit(":", 1)[1]) for _ in names]  # (never read: the collector is not started)
    infos = [
        AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", addresses=[socket.inet_aton(LOOPBACK)], port=port,
                         properties={"txtvers": "1", "id": name, "cluster": cluster}, server=f"{name}.local.")
        for name, port in zip(names, ports, strict=True)
    ]  # fmt: skip
    collector = Collector(interval=60)
    watcher = MdnsWatcher(collector, [LOOPBACK], cluster=cluster)
    await watcher.start()
    try:
        await asyncio.gather(*[await zc.async_register_service(info) for info in infos])
        assert await wait_for(lambda: len(watcher.seen) == 5, 15)
    finally:
        await watcher.stop()
        await collector.stop()
        await zc.async_unregister_all_services()
    assert len(collector.nodes) == 3
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "the most it watches" in r.getMessage()]
    assert len(warned) == 1 and "3 nodes watched" in warned[0].getMessage()


async def test_times_a_node_reports_are_kept_between_its_start_and_now():
    """A node whose clock is 1000 s ahead, up for 50 s: its records are moved to the collector's clock; one
    dated 1e9 s ahead (it stretched the chart over 31 years), one before the node started, and an exchange
    at t = 1e308 (an edge of the last minute for ever) are left out."""
    skew = 1000.0

    def history() -> bytes:
        now = time.time() + skew
        evals = [(now - 10, 0.5), (now + 1e9, 0.6), (now - 1e6, 0.7), (1e308, 0.8), (now - 60, 0.9)]
        when = [(1e308, "forever"), (now - 2, "peer"), (now + 3600, "later")]
        exchanges = [
            {"seq": i + 1, "t": t, "peer": p, "role": "initiated", "result": "ok"} for i, (t, p) in enumerate(when)
        ]
        return history_of(*evals, now=now, exchanges=exchanges)

    routes = {"/v1/status": status_of("skewed", uptime_s=50.0), "/v1/history": history}
    async with raw_node(routes) as url:
        collector = Collector([url], interval=1, models=False)
        try:
            await collector.sample()
        finally:
            await collector.stop()
    doc = collector.document()
    (row,) = doc["nodes"]
    assert [a for _, a in row["series"]] == [0.5]
    assert abs(row["series"][0][0] - (doc["now"] - 10)) < 2  # on the collector's clock
    assert [(e["a"], e["b"], e["count"]) for e in doc["edges"]] == [("peer", "skewed", 1)]


async def test_the_document_is_built_once_per_sample_however_many_pages_poll():
    """Ten polls between two samples build the document once (1024 nodes of 600 points cost about a second of
    the event loop each); after the next sample it is built again and shows it."""

    class Counting(Collector):
        built = 0

        def document(self) -> dict:
            self.built += 1
            return super().document()

    routes = {"/v1/status": status_of("n"), "/v1/history": history_of((time.time() - 1, 0.5))}
    async with raw_node(routes) as url:
        collector = Counting([url], interval=60, models=False)
        async with DashboardServer(collector, port=0) as server:
            assert await wait_for(lambda: collector.samples == 1, 5)
            first = [await get_json(server.url + "api/network") for _ in range(10)]
            await collector.sample()
            second = [await get_json(server.url + "api/network") for _ in range(10)]
    assert collector.built == 2
    assert {doc["samples"] for _, doc in first} == {1} and {doc["samples"] for _, doc in second} == {2}
    assert all(status == 200 for status, _ in first + second)
    assert dumps_finite({"a": [math.nan, 1.5, math.inf]}) == '{"a": [null, 1.5, null]}'  # (none should be left)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dashboard", "--seeds", "ftp://127.0.0.1:1", "--port", "0"], "expected http[s]://host:port"),
        (["dashboard", "--seeds", "http://127.0.0.1:1/v1/status", "--port", "0"], "expected http[s]://host:port"),
        (["dashboard", "--seeds", "http://127.0.0.1:1", "--port", "70000"], "--port must be from 0 to 65535"),
        (["testbed", "--nodes", "2", "--dashboard-port", "-1"], "--dashboard-port must be from 0 to 65535"),
    ],
)
def test_bad_dashboard_options_are_one_line_and_exit_2(argv, message, capsys):
    from gossipfl.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gossipfl: error: ") and message in err and err.count("\n") == 1

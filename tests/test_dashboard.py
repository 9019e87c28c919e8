"""The node dashboard (GET /): served by the node itself, open while the data behind it needs the read token,
and, in a real browser (tests/browser.py: skipped without Chromium), without console errors, drawing what
/v1/history says, updating live, asking for the token once without putting it in a URL, and showing a peer's
HTML as text."""

from __future__ import annotations

import contextlib
import json
import re
import time

import pytest
from aiohttp import web

from gossipfl.serving.dashboard import CSP

from .browser import browser, open_page  # noqa: F401  (browser: a fixture)
from .helpers import running, served, wait_for
from .test_members import key_file  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(90)
TOKEN = "dashboard-t0ken"
EVIL = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


async def test_page_and_assets_come_from_the_node(make_config, http):
    async with running(make_config(no_train=True)) as (n,):
        async with http.get(n.url + "/") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            assert r.headers["Content-Security-Policy"] == CSP
            page = await r.text()
        refs = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert {"/static/node.js", "/static/dashboard.css"} <= set(refs)
        seen = set()
        todo = [u for u in refs if u.startswith("/static/")]
        while todo:  # every asset, and every module they import, is served here
            url = todo.pop()
            seen.add(url)
            async with http.get(n.url + url) as r:
                assert r.status == 200, url
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                body = await r.text()
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body), url  # nothing from elsewhere
            todo += [f"/static/{m}" for m in re.findall(r'from "\./([\w.]+)"', body) if f"/static/{m}" not in seen]
        assert {"/static/chart.js", "/static/common.js"} <= seen
        for bad in ("/static/nope.js", "/static/..%2Fdashboard.py", "/static/dashboard.py"):
            async with http.get(n.url + bad) as r:
                assert r.status == 404, bad


async def test_the_page_is_open_but_its_data_needs_the_token(make_config, key_file, http):  # noqa: F811
    async with running(make_config(no_train=True, secret_file=key_file, read_token=TOKEN)) as (n,):
        for path in ("/", "/static/node.js"):
            async with http.get(n.url + path) as r:
                assert r.status == 200, path
        for path in ("/v1/status", "/v1/history"):
            async with http.get(n.url + path) as r:
                assert r.status == 401, path
            async with http.get(n.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200, path


async def test_node_page_draws_its_history_and_updates(browser, make_config, http):  # noqa: F811
    async with running(make_config(id="dash-a", eval_interval=0.3)) as (a,):
        async with running(make_config(id="dash-b", eval_interval=0.3, seeds=(f"127.0.0.1:{a.port}",))) as (b,):
            assert await wait_for(lambda: b.gossiper.stats.ok >= 2 and len(b.evals) >= 2, 20)
            w = await open_page(browser, b.url + "/")
            await w.wait_updates(2)
            first = json.loads(await w.js("return document.querySelector('#chart-accuracy path').dataset.last"))
            n0 = int(await w.js("return document.querySelector('#chart-accuracy path').dataset.n"))
            async with http.get(b.url + "/v1/history") as r:
                history = await r.json()
            async with http.get(b.url + "/v1/status") as r:
                status = await r.json()
            await w.wait_updates(5)  # 3 more polls: about 6 s
            n1 = int(await w.js("return document.querySelector('#chart-accuracy path').dataset.n"))
            peers = await w.js("return [...document.querySelectorAll('#peers tbody tr')].map(r => r.dataset.peer)")
            rows = await w.js("return document.querySelectorAll('#exchanges tbody tr').length")
            title = await w.js("return document.getElementById('node-id').textContent")
    assert w.problems == []
    assert title == "dash-b"
    # the point drawn last is one of the node's evaluations, and the accuracy /v1/status reports is drawn
    assert [first[0], first[1]] in [[e["t"], e["accuracy"]] for e in history["evals"]]
    assert status["metrics"]["accuracy"] in [e["accuracy"] for e in history["evals"]]
    assert n1 > n0 >= 2  # new points arrived without a reload
    assert peers == ["dash-a"] and rows >= 2


async def test_token_is_asked_once_and_never_put_in_a_url(browser, make_config, key_file):  # noqa: F811
    async with running(make_config(no_train=True, secret_file=key_file, read_token=TOKEN)) as (n,):
        w = await open_page(browser, n.url + "/")
        urls, auth = [], []
        w.page.on("request", lambda r: (urls.append(r.url), auth.append(r.headers.get("authorization"))))
        await w.page.wait_for_selector("#token-form:not([hidden])", timeout=10000)
        await w.page.fill("#token-input", "wrong-token")
        await w.page.click("#token-form button")
        await w.page.wait_for_selector("#token-form:not([hidden])", timeout=10000)  # refused: asked again
        message = await w.js("return document.getElementById('token-message').textContent")
        await w.page.fill("#token-input", TOKEN)
        await w.page.click("#token-form button")
        await w.wait_updates(2)
        stored = await w.js("return sessionStorage.getItem('gossipfl-read-token')")
        await w.page.reload()  # the same tab: the token is still there, not asked again
        await w.wait_updates(1)
        hidden = await w.js("return document.getElementById('token-form').hidden")
    assert "refused" in message and stored == TOKEN and hidden
    assert not any(TOKEN in u or "wrong-token" in u for u in urls)
    assert f"Bearer {TOKEN}" in auth
    # the 401s of the wrong token and of the first load are the only problems
    assert w.problems and all(p.startswith(("HTTP 401", "console error: Failed to load resource")) for p in w.problems)


def fake_peers(node_ref: list, ids: list[str], tasks: list[str | None]) -> list[web.Application]:
    """Servers that answer /v1/status as the node itself would, but with ``ids[i]`` (and, when given, task
    ``tasks[i]``), and refuse every exchange with an error message made of HTML."""
    apps = []
    for peer_id, task in zip(ids, tasks, strict=True):

        async def status(request: web.Request, peer_id: str = peer_id, task: str | None = task) -> web.Response:
            doc = {**node_ref[0].status(), "id": peer_id}
            if task is not None:
                doc["task"] = task
            return web.json_response(doc)

        async def gossip(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"error": EVIL}, status=400)

        app = web.Application()
        app.router.add_get("/v1/status", status)
        app.router.add_post("/v1/gossip", gossip)
        apps.append(app)
    return apps


async def test_html_from_peers_is_shown_as_text(browser, make_config):  # noqa: F811
    node_ref: list = []
    async with contextlib.AsyncExitStack() as fakes:
        apps = fake_peers(node_ref, [EVIL, "other-task-peer"], [None, EVIL])
        seeds = tuple([(await fakes.enter_async_context(served(app))).removeprefix("http://") for app in apps])
        async with running(make_config(id="dash-x", no_train=True, seeds=seeds, gossip_interval=0.2)) as (n,):
            node_ref.append(n)
            assert await wait_for(lambda: n.gossiper.stats.failed >= 1 and n.peers.ignored(), 20)
            w = await open_page(browser, n.url + "/")
            await w.wait_updates(2)
            xss = await w.js("return window.__xss === undefined ? null : window.__xss")
            injected = await w.js("return document.querySelectorAll('img, script:not([src])').length")
            cells = await w.js(
                "return [...document.querySelectorAll('#peers td, #exchanges td')].map(t => t.textContent)"
            )
    assert xss is None and injected == 0
    assert EVIL in cells  # the peer's id, as text, in the peers table and the exchanges
    assert any(EVIL in c and c != EVIL for c in cells)  # its error message, and the other's task in a reason
    assert w.problems == []


async def test_a_restarted_node_is_read_again_from_its_start(browser, make_config):  # noqa: F811
    cfg = make_config(id="restarts", no_train=True, eval_interval=0.1)
    async with running(cfg) as (a,):
        port = a.port
        assert await wait_for(lambda: a.evals.after()[-1]["seq"] >= 40 if len(a.evals) else False, 30)
        w = await open_page(browser, a.url + "/")
        await w.wait_updates(2)
    await w.page.wait_for_function(  # while the node is down the page says so
        "() => document.getElementById('connection').classList.contains('down')", timeout=10000
    )
    down = await w.js("return document.getElementById('connection').textContent")
    restarted = time.time()
    async with running(make_config(id="restarts", no_train=True, eval_interval=0.1, port=port)) as (b,):
        assert await wait_for(lambda: len(b.evals) >= 3, 20)
        w.problems.clear()  # (the polls while it was down failed)
        updates = await w.js("return window.gossipflDashboard.updates")
        await w.wait_updates(updates + 2)
        last_t = await w.js("const e = window.gossipflDashboard.evals; return e[e.length - 1].t")
        first_t = await w.js("return window.gossipflDashboard.evals[0].t")
    assert down.startswith("cannot reach the node: ")
    assert last_t > restarted and first_t > restarted  # the new run's points, and only those
    assert w.problems == []


async def test_a_token_a_header_cannot_carry_is_asked_for_again(browser, make_config, key_file):  # noqa: F811
    async with running(make_config(no_train=True, secret_file=key_file, read_token=TOKEN)) as (n,):
        w = await open_page(browser, n.url + "/")
        await w.page.wait_for_selector("#token-form:not([hidden])", timeout=10000)
        await w.page.fill("#token-input", "dashboard\u2019t0ken")  # a typographic apostrophe, pasted from a doc
        await w.page.click("#token-form button")
        message = await w.js("return document.getElementById('token-message').textContent")
        visible = await w.js("return !document.getElementById('token-form').hidden")
        stored = await w.js("return sessionStorage.getItem('gossipfl-read-token')")
        await w.page.fill("#token-input", TOKEN)
        await w.page.click("#token-form button")
        await w.wait_updates(1)
    assert "printable ASCII" in message and visible and stored is None


async def test_identical_models_are_not_shown_as_no_exchange(browser, make_config):  # noqa: F811
    async with running(make_config(id="same-a", no_train=True)) as (a,):
        async with running(make_config(id="same-b", no_train=True, seeds=(f"127.0.0.1:{a.port}",))) as (b,):
            assert await wait_for(lambda: b.gossiper.stats.ok >= 2, 20)
            w = await open_page(browser, b.url + "/")
            await w.wait_updates(2)
            text = await w.js("return document.getElementById('chart-distance').textContent")
    assert "identical" in text and "no exchange" not in text


async def test_privacy_budget_spent_is_shown_with_dp(browser, make_config, http, tmp_path):  # noqa: F811
    dp = dict(partition="0/16", join_wait=0, dp_noise_multiplier=1.0, dp_epsilon_budget=50.0, state_dir=str(tmp_path))
    async with running(make_config(eval_interval=0.3, **dp)) as (n,):
        assert await wait_for(lambda: n.learner.privacy.spent[0] > 0 and len(n.evals) >= 2, 30)
        w = await open_page(browser, n.url + "/")
        await w.wait_updates(2)
        text = await w.js("const p = document.getElementById('privacy'); return p.hidden ? null : p.textContent")
        path = "document.querySelector('#chart-epsilon path[data-series=\"ε spent\"]')"
        last = json.loads(await w.js(f"return {path}.dataset.last"))
        async with http.get(n.url + "/v1/history") as r:
            evals = (await r.json())["evals"]
    assert text is not None and "of 50" in text
    assert [last[0], last[1]] in [[e["t"], e["epsilon"]] for e in evals] and last[1] > 0
    assert w.problems == []

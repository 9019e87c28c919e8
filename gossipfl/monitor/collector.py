"""The ``Collector``: reads every watched node each interval and keeps what the network view shows.

One sample reads, for every node at once, ``/v1/status`` and ``/v1/history`` (incrementally: only what is
new since the cursors of the last read) and, with ``models=True``, ``/v1/model`` for the consensus
distance. Each node's reads are bounded by ``timeout``: a node that hangs or refuses is marked unreachable
with the reason, and the others are up to date when the sample ends, at most ``timeout`` later. The read
token, when given, goes in an ``Authorization`` header to the watched nodes only, never into a log or the
document (redirects are not followed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
import yarl

from gossipfl.common.httpio import BodyError, TooLarge, read_limited
from gossipfl.common.timeline import Timeline
from gossipfl.monitor import models
from gossipfl.monitor.records import NodeRecord
from gossipfl.protocol.wire import WireError
from gossipfl.security.http import error_text
from gossipfl.serving.client import auth_headers, base_url

log = logging.getLogger("gossipfl.monitor")
EDGE_WINDOW_S = 60.0  # the graph shows the exchanges of the last minute
CONSENSUS_POINTS = 900  # the whole run, thinned further back
MAX_JSON_BYTES = 4 << 20
MAX_NODES = 1024
MODEL_READ_RATE = 1e6  # bytes per second each node spends, on average, sending its model to the network view


def _reason(e: BaseException, timeout: float) -> str:
    """One line saying why a read failed."""
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect: {e.os_error.strerror or e.os_error}"
    if isinstance(e, aiohttp.ClientError | BodyError | TooLarge | ValueError | OSError):
        return str(e) or type(e).__name__
    return f"{type(e).__name__}: {e}"


class Collector:
    """The nodes at ``urls`` (more can be added while it runs), read every ``interval`` seconds."""

    def __init__(
        self,
        urls: Iterable[str] = (),
        *,
        interval: float = 2.0,
        timeout: float | None = None,
        token: str | None = None,
        cacert: str | None = None,
        models: bool = True,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):  # (nan: a busy loop; inf: one read, then none)
            raise ValueError("interval must be a number of seconds > 0")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a number of seconds > 0")
        self.interval = interval
        self.timeout = timeout if timeout is not None else min(3.0, max(0.5, interval))
        self.models = models
        self.nodes: dict[str, NodeRecord] = {}
        self.consensus = Timeline(CONSENSUS_POINTS, thin=True)  # {"t", "distance", "relative", "nodes"}
        self.samples = 0
        self.version = 0  # changes whenever the document does (a sample ended, a node or a distance added)
        self._models_due = 0.0  # when the models are read next (time.time()): large ones less often
        self._headers = {"Accept": "application/json", **auth_headers(token)}
        self._ssl: ssl.SSLContext | bool = True
        if cacert:  # an https node's certificate, checked against the cluster CA by chain (as the client does)
            self._ssl = ssl.create_default_context(cafile=cacert)
            self._ssl.check_hostname = False
        self._measure_failed = self._full = False  # (each logged once)
        self._unshown: set[str] = set()  # the nodes whose row failed (logged once each)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        for url in urls:
            self.add(url)

    def add(self, url: str) -> bool:
        """Watch the node at ``url`` (http[s]://host:port); False when it is watched already (or too many are)."""
        url = base_url(url)
        try:
            parsed = yarl.URL(url)
        except ValueError as e:
            raise ValueError(f"{url}: not a node's address: {e}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in ("", "/") or parsed.query:
            raise ValueError(f"{url}: expected http[s]://host:port")
        if url in self.nodes:
            return False
        if len(self.nodes) >= MAX_NODES:
            if not self._full:
                self._full = True
                log.warning(
                    "network view: %d nodes watched, the most it watches: %s and any later are not", MAX_NODES, url
                )
            return False
        self.nodes[url] = NodeRecord(url)
        self.version += 1
        return True

    def add_consensus(self, t: float, distance: float | None, relative: float | None, nodes: int = 0) -> None:
        """A consensus distance measured elsewhere (the testbed reads every model anyway): ``t`` on this clock.
        One that is not a finite number (models so far apart that it overflowed) is left out."""
        if distance is None or not math.isfinite(distance):
            return
        relative = relative if relative is not None and math.isfinite(relative) else None
        self.consensus.add({"t": round(t, 3), "distance": distance, "relative": relative, "nodes": nodes})
        self.version += 1

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Sample now and then every ``interval`` seconds, in the background, until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.sample()
            except Exception:  # a bug here must not end the loop: say so once per sample
                log.exception("network view: a sample failed")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no connection limit (aiohttp's default is 100): 50 hung nodes, two reads each, would hold every
            # connection until the timeout, and a healthy node read in the same sample would wait for one
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self._session

    async def sample(self) -> None:
        """Read every node once (at most ``timeout`` seconds, whatever the nodes do)."""
        t = time.time()
        nodes = list(self.nodes.values())
        reads = [self._read(n) for n in nodes]
        models_now = self.models and t >= self._models_due
        fetches = [self._model(n) for n in nodes] if models_now else []
        results = await asyncio.gather(*reads, *fetches)
        self.samples += 1
        self.version += 1
        if models_now:
            got = {n.url: m for n, m in zip(nodes, results[len(nodes) :], strict=True) if m is not None}
            # a node sends its model every interval, or, for a large one, at MODEL_READ_RATE on average
            largest = max((m.nbytes for m in got.values()), default=0)
            self._models_due = t + max(self.interval, largest / MODEL_READ_RATE) - self.interval / 2
            await self._measure(t, got)

    async def _measure(self, t: float, got: dict[str, models.Model]) -> None:
        """The consensus distance of the models read at ``t``; a failure (a model not foreseen) is logged once
        and leaves the rest of the sample as it is."""
        try:
            measured = await asyncio.to_thread(models.consensus, got) if len(got) > 1 else None
        except Exception:
            if not self._measure_failed:
                self._measure_failed = True
                log.exception("network view: the consensus distance could not be measured")
            return
        if measured is not None:
            self.add_consensus(t, *measured)

    async def _get(self, url: str, limit: int) -> bytearray:
        async with self._client().get(url, allow_redirects=False, ssl=self._ssl) as resp:
            if resp.status != 200:
                detail = error_text(await resp.content.read(1024))
                hint = " (the dashboard's read token: --token or GOSSIPFL_TOKEN)" if resp.status == 401 else ""
                raise ValueError(f"HTTP {resp.status}: {detail}{hint}")
            return await read_limited(resp.content, resp.content_length, limit)

    async def _json(self, url: str) -> Any:
        body = await self._get(url, MAX_JSON_BYTES)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ValueError("not a gossipfl node: the answer is not JSON") from None

    async def _read(self, node: NodeRecord) -> None:
        query = f"?evals_after={node.evals_after}&exchanges_after={node.exchanges_after}"
        try:
            async with asyncio.timeout(self.timeout):
                status, history = await asyncio.gather(
                    self._json(node.url + "/v1/status"), self._json(node.url + "/v1/history" + query)
                )
            node.take(status, history, time.time())
        except Exception as e:  # whatever a node does, it is only marked unreachable
            node.failed(_reason(e, self.timeout))

    async def _model(self, node: NodeRecord) -> models.Model | None:
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._get(node.url + "/v1/model", models.MAX_MODEL_BYTES)
            return await asyncio.to_thread(models.model_of, body)
        except (WireError, ValueError, TooLarge, BodyError, aiohttp.ClientError, TimeoutError, OSError):
            return None  # (the status read says why a node is unreachable)

    def document(self) -> dict[str, Any]:
        """``GET /api/network``: every node, the exchanges of the last minute, and the consensus distance."""
        now = time.time()
        pairs: dict[tuple[str, str], list[float]] = {}
        for node in self.nodes.values():
            if node.id is None:
                continue
            for peer, t in node.edges:
                if t >= now - EDGE_WINDOW_S and peer != node.id:
                    pairs.setdefault((min(node.id, peer), max(node.id, peer)), []).append(t)
        return {
            "now": round(now, 3),
            "interval_s": self.interval,
            "samples": self.samples,
            "nodes": sorted((self._row(n, now) for n in self.nodes.values()), key=lambda r: r["id"] or r["url"]),
            "edges": [
                {"a": a, "b": b, "count": len(ts), "last_t": round(max(ts), 3)} for (a, b), ts in sorted(pairs.items())
            ],
            "edge_window_s": EDGE_WINDOW_S,
            "consensus": [[r["t"], r["distance"], r["relative"]] for r in self.consensus.after(0)],
        }

    def _row(self, node: NodeRecord, now: float) -> dict[str, Any]:
        """``node.row``; should it fail (something in a node's answer not foreseen), a row saying so: one node
        never takes the document down for everyone."""
        try:
            return node.row(now)
        except Exception:
            if node.url not in self._unshown:
                self._unshown.add(node.url)
                log.exception("network view: the row of %s cannot be shown", node.url)
            return node.unshown("the network view cannot show what this node answered")

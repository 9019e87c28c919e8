"""The network view's web server: ``GET /`` (the page, ``network.html``), its assets, and ``GET /api/network``
(the collector's document).

The server holds the nodes' read token and the browser needs none, so whoever reaches this server reads
what the token protects: it binds 127.0.0.1 by default. Bound to loopback, it also answers only requests
addressed to a loopback name (the ``Host`` header), so a web page elsewhere cannot read it through a DNS
name that it points at 127.0.0.1 (DNS rebinding)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from aiohttp import web

from gossipfl.monitor.collector import Collector
from gossipfl.serving import dashboard
from gossipfl.serving.errors import dumps_finite, error, json_errors
from gossipfl.serving.httpserver import NodeRunner

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8480  # a node's default is 8470: both fit on one host
_COLLECTOR = web.AppKey("collector", Collector)
_LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def loopback_names_only(request: web.Request, handler: object) -> web.StreamResponse:
    """Refuse (421) a request whose Host header does not name loopback, and (400) one whose Host is no host
    name at all (an IPv6 address without brackets: yarl raises ValueError)."""
    try:
        host = request.url.host or ""
    except ValueError:
        return error(400, "malformed Host header")
    if not is_loopback(host):
        return error(421, "this dashboard answers requests to 127.0.0.1 or localhost only")
    return await handler(request)  # type: ignore[operator]


@dataclass
class _Answer:
    """The last ``/api/network`` body and the collector's ``version`` it shows: built once per sample, however
    many pages poll (1024 nodes of 600 points: about a second of the event loop each time)."""

    version: int = -1
    body: bytes = b""


_ANSWER = web.AppKey("answer", _Answer)


async def get_network(request: web.Request) -> web.Response:
    collector, answer = request.app[_COLLECTOR], request.app[_ANSWER]
    if answer.version != collector.version or not answer.body:
        answer.version, answer.body = collector.version, dumps_finite(collector.document()).encode()
    return web.Response(body=answer.body, content_type="application/json", headers=dashboard.HEADERS)


def build_app(collector: Collector, *, loopback_only: bool = True) -> web.Application:
    """The page, its assets and ``/api/network``; ``loopback_only``: refuse Host names other than loopback."""
    middlewares = [json_errors, loopback_names_only] if loopback_only else [json_errors]
    app = web.Application(middlewares=middlewares)
    app[_COLLECTOR] = collector
    app[_ANSWER] = _Answer()
    dashboard.add_routes(app, index="network.html")
    app.router.add_get("/api/network", get_network)
    return app


class DashboardServer:
    """The collector, sampling in the background, and the page that shows it, on ``host:port`` (0: any free port)."""

    def __init__(self, collector: Collector, host: str = LOOPBACK, port: int = DEFAULT_PORT) -> None:
        self.collector = collector
        self.host = host
        self.port = port
        self._runner: NodeRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> str:
        """Start sampling and serving; the page's URL."""
        self._runner = NodeRunner(build_app(self.collector, loopback_only=is_loopback(self.host)))
        await self._runner.setup()
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.create_server((self.host, self.port), family=family)
            self.port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        await self.collector.start()
        return self.url

    async def stop(self) -> None:
        await self.collector.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

"""The node's HTTP server: aiohttp's, with the limits a daemon on a LAN needs.

- Errors raised before a request reaches the app (aiohttp's parser: a bad request line, headers too
  large or too many, broken chunked encoding) answer in the one error shape, JSON ``{"error": ...}``,
  like every route, and are logged at debug level: they are the client's fault, and a flood of them
  must not flood the log. So is a broken body met again after the answer, when aiohttp drains what the
  app did not read (a Content-Encoding that does not decode).
- At most ``max_connections`` connections at once: more are answered 503 and closed at once, so that
  slow or stuck clients cannot take every file descriptor and starve ``/v1/status``.
- A connection that sends nothing for ``idle_timeout`` seconds is closed, and shutting down waits at
  most ``shutdown_timeout`` seconds for requests in flight (aiohttp's default is 60 s, longer than the
  10 s that ``docker stop`` grants).
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

log = logging.getLogger("gossipfl.http")

MAX_CONNECTIONS = 256
IDLE_TIMEOUT_S = 15.0
SHUTDOWN_TIMEOUT_S = 1.0  # aiohttp waits this long twice
LINGER_S = 1.0


def _json_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Handler(RequestHandler):
    """One connection. Overrides how errors outside the app are answered, and refuses connections over
    the server's limit."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        limit = getattr(manager, "max_connections", MAX_CONNECTIONS)
        if manager is not None and len(manager.connections) > limit:
            body = _json_body(503, "too many connections; retry later")
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode()
            transport.write(head + body)  # type: ignore[attr-defined]
            self.force_close()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, RequestPayloadError):
            # a body the client broke (framing, or a Content-Encoding that does not decode) and the app left
            # unread or answered already: aiohttp meets the error again when it drains the body after the
            # answer. The client's fault, answered already: one debug line, not a traceback per request.
            log.debug("unusable request body from %s: %s", self.peername, str(exc).replace("\n", " "))
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 and status != 504:
            log.error("error handling a request from %s: %s", request.remote, exc, exc_info=exc)
        else:
            log.debug("bad request from %s: %s %s", request.remote, status, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        text = (message or "").strip() if status < 500 else ""
        resp = web.Response(
            status=status,
            body=_json_body(status, f"{phrase}: {text}" if text else phrase),
            content_type="application/json",
        )
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class NodeRunner(web.AppRunner):
    """An AppRunner whose connections are ``_Handler``s."""

    def __init__(self, app: web.Application, *, max_connections: int = MAX_CONNECTIONS, **kwargs: Any) -> None:
        # keepalive_timeout also closes a new connection that sends no request at all
        kwargs.setdefault("keepalive_timeout", IDLE_TIMEOUT_S)
        # after answering a request whose body was not read (a refusal), drain it for at most this long
        kwargs.setdefault("lingering_time", LINGER_S)
        kwargs.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT_S)
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("handle_signals", False)
        super().__init__(app, **kwargs)
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # aiohttp builds the Server; only its connection factory changes
        server.max_connections = self.max_connections  # type: ignore[attr-defined]
        return server

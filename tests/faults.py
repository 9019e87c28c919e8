"""Fault injection for tests, in the style of hivemind's fault-tolerance tests: peers that misbehave in
one named way each (``Fault``), a proxy that loses or delays one phase of an exchange, raw uploads
that stall or hang up, and node processes that can be paused with SIGSTOP. Everything listens on
127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

LOOPBACK = "127.0.0.1"


class Fault(enum.Enum):
    """How a fake peer answers ``POST /v1/gossip``."""

    HANG = "hang"  # accepts the request, never answers
    SLOW = "slow"  # answers a valid-looking 200 one byte at a time, far too slowly
    CLOSE_MID_BODY = "close mid-body"  # announces a body, sends half of it, closes
    STALL_MID_BODY = "stall mid-body"  # announces a body, sends half of it, then nothing, the connection open
    GARBAGE = "garbage"  # 200 with bytes that are not msgpack
    NON_UTF8_ERROR = "non-UTF-8 error"  # a 500 whose body is not valid UTF-8
    WRONG_SENDER = "wrong sender"  # 200 with a valid message of someone else's exchange


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def faulty_peer(fault: Fault, valid_reply: bytes = b"") -> AsyncIterator[tuple[str, list[str]]]:
    """A fake peer whose gossip endpoint misbehaves as ``fault`` says; yields its URL and a log of the
    requests it received."""
    seen: list[str] = []
    forever = asyncio.Event()

    async def gossip(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        await request.read()
        if fault is Fault.HANG:
            await forever.wait()
        if fault is Fault.GARBAGE:
            return web.Response(body=b"\xc1\xc1 not msgpack", content_type="application/msgpack")
        if fault is Fault.NON_UTF8_ERROR:
            return web.Response(status=500, body=b"\xff\xfe\xfa broken \x80\x81", content_type="text/plain")
        if fault is Fault.WRONG_SENDER:
            return web.Response(body=valid_reply, content_type="application/msgpack")
        resp = web.StreamResponse(headers={"Content-Type": "application/msgpack"})
        resp.content_length = 20_000
        await resp.prepare(request)
        if fault is Fault.CLOSE_MID_BODY:
            await resp.write(b"\x00" * 10_000)
            assert request.transport is not None
            request.transport.close()
            return resp
        if fault is Fault.STALL_MID_BODY:
            await resp.write(b"\x00" * 10_000)
            await forever.wait()
            return resp
        for _ in range(20_000):  # SLOW
            await resp.write(b"\x00")
            await asyncio.sleep(1.0)
        return resp

    async def decide(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"xid": request.match_info["xid"], "outcome": "aborted", "reason": "fake"})

    app = web.Application()
    app.router.add_post("/v1/gossip", gossip)
    app.router.add_post("/v1/gossip/{xid}/{decision}", decide)
    try:
        async with serve(app) as url:
            yield url, seen
    finally:
        forever.set()


class Phase(enum.Enum):
    LOSE_REQUEST = "lose the request"  # never forwarded; the caller waits until it gives up
    LOSE_REPLY = "lose the reply"  # forwarded (the target acts on it), the answer never comes back
    DELAY = "delay"  # forwarded late, after the caller gave up
    CUT_REPLY = "cut the reply"  # forwarded (the target acts on it), the answer cut off mid-body


class FaultProxy:
    """Stands between an initiator and a real responder. ``plan[phase]`` lists faults applied to the next
    requests of that phase ("prepare", "commit", "abort"), one per request; then requests pass."""

    def __init__(self, target: str, *, hold: float = 3.0) -> None:
        self.target = target
        self.hold = hold  # how long a lost request or reply is held (longer than the caller waits)
        self.plan: dict[str, list[Phase]] = {"prepare": [], "commit": [], "abort": []}
        self.forwarded: list[str] = []
        self.holding = 0  # requests the proxy is still holding
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_post("/v1/gossip", self._handle)
        app.router.add_post("/v1/gossip/{xid}/{decision}", self._handle)
        app.router.add_get("/v1/status", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.holding += 1
        try:
            return await self._forward(request)
        finally:
            self.holding -= 1

    async def _forward(self, request: web.Request) -> web.Response:
        phase = request.match_info.get("decision", "prepare" if request.method == "POST" else "read")
        plan = self.plan.get(phase)
        fault = plan.pop(0) if plan else None
        body = await request.read()
        if fault is Phase.LOSE_REQUEST:
            await asyncio.sleep(self.hold)
            return web.Response(status=504)
        if fault is Phase.DELAY:
            await asyncio.sleep(self.hold)
        assert self._session is not None
        async with self._session.request(
            request.method, self.target + request.path, data=body, headers={"Content-Type": request.content_type}
        ) as r:
            reply, status, ctype = await r.read(), r.status, r.content_type
        self.forwarded.append(f"{phase}:{status}")
        if fault is Phase.LOSE_REPLY:
            await asyncio.sleep(self.hold)
        if fault is Phase.CUT_REPLY:
            resp = web.StreamResponse(status=status, headers={"Content-Type": ctype})
            resp.content_length = len(reply) + 100
            await resp.prepare(request)
            await resp.write(reply[: len(reply) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp  # type: ignore[return-value]
        return web.Response(status=status, body=reply, content_type=ctype)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with aiohttp.ClientSession() as self._session, serve(self.app()) as url:
            yield url


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP response (head and Content-Length body), or what came before the server closed."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def raw_request(port: int, head: bytes, body: bytes = b"", *, read: bool = True, timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return the response that comes back."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(head + body)
        await writer.drain()
        if not read:
            return b""
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


def json_of(data: bytes) -> dict:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


class NodeProcess:
    """A ``gossipfl node`` process, with its log in a file."""

    def __init__(self, args: list[str], log_path: str, *, port: int | None = None, host: str = LOOPBACK) -> None:
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, "-m", "gossipfl", "node", "--host", host, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def status(self, timeout: float = 2.0) -> dict:
        with urllib.request.urlopen(self.url + "/v1/status", timeout=timeout) as r:
            return json.load(r)

    def model(self, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.url + "/v1/model", timeout=timeout) as r:
            return r.read()

    def wait_up(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {open(self.log_path).read()}")
            try:
                return self.status()
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"node on port {self.port} not up in {timeout} s")

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 20.0) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds it took), code None if it did not exit in time (then killed)."""
        start = time.monotonic()
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def exchanges_done(status: dict) -> int:
    """Exchanges a node took part in and committed, on either side."""
    ex = status["exchanges"]
    return ex["ok"] + ex["served"] + ex["late"]


def quiet(status: dict) -> bool:
    ex = status["exchanges"]
    return not (ex.get("in_flight") or ex.get("prepared") or ex.get("doubtful"))


def consistent_cut(nodes: list[NodeProcess], decode, timeout: float = 30.0) -> list:
    """The nodes' models at one moment when no exchange is under way anywhere: read every status, every
    model, every status again, and keep the reading only if nothing was in flight, prepared or in doubt
    before and after, and no node merged in between."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [n.status() for n in nodes]
        if all(quiet(s) for s in before):
            models = [decode(n.model()) for n in nodes]
            after = [n.status() for n in nodes]
            if all(quiet(s) for s in after) and [s.get("merges") for s in before] == [s.get("merges") for s in after]:
                return models
        time.sleep(0.02)
    raise TimeoutError("no quiet moment to read the models in")

"""The worker processes of benchmarks/exchange.py, one role per process, and the /proc memory readings it
takes of every process it measures.

    python benchmarks/exchange_workers.py ROLE 'JSON ARGS'

prints its result as one JSON line on stdout. Roles: ``tcp-server``/``tcp-client`` (raw loopback TCP
from and into preallocated buffers), ``http-get`` (reads ``GET /v1/model`` of a node fully into a
preallocated buffer), ``ser-server``/``ser-client`` (a push-pull exchange of a state dict serialised with
pickle or torch.save over HTTP: the usual baseline). Benchmark-only code on loopback with our own bytes:
pickle and torch.load never see anything else, and nothing here is part of the package."""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HOST = "127.0.0.1"
CHUNK = 16 << 20  # bytes per recv_into / readinto call at most


# --- memory of a process, from /proc (Linux) ------------------------------------------------------------


def mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak RSS since start or since the last ``reset_peak``) of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    """Reset ``pid``'s VmHWM to its current RSS (``5 > /proc/PID/clear_refs``: root or the owner)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) that ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, wait_s: float = 0.2, tries: int = 15) -> int:
    """The RSS of an idle process: read until two readings ``wait_s`` apart differ by under 1 MiB."""
    last = mem(pid)["VmRSS"]
    for _ in range(tries):
        time.sleep(wait_s)
        now = mem(pid)["VmRSS"]
        if abs(now - last) < 1 << 20:
            return now
        last = now
    return last


# --- raw TCP ---------------------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, view: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(view[got : got + min(CHUNK, n - got)])
        if not k:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def tcp_server(port: int, nbytes: int) -> dict:
    """Answer the client's messages: op ``o`` (N bytes in, 1 byte ack out) or ``r`` (N in, N out), ``q`` ends."""
    with socket.create_server((HOST, port)) as srv:
        conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(bytearray(nbytes))
    op = memoryview(bytearray(1))
    with conn:
        while True:
            recv_exact(conn, op, 1)
            if op[0] == ord("q"):
                return {}
            recv_exact(conn, view, nbytes)
            conn.sendall(b"k" if op[0] == ord("o") else view)


def tcp_client(port: int, nbytes: int, repeats: int) -> dict:
    """Per repeat: one way (N bytes to the server, until its ack) and round trip (N there, N back)."""
    out = memoryview(bytearray(os.urandom(min(nbytes, 1 << 20))) * max(1, -(-nbytes // (1 << 20))))[:nbytes]
    back = memoryview(bytearray(nbytes))
    ack = memoryview(bytearray(1))
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection((HOST, port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    one_way, round_trip = [], []
    with sock:
        for i in range(repeats + 1):  # the first of each is a warm-up, not counted
            t0 = time.perf_counter()
            sock.sendall(b"o")
            sock.sendall(out)
            recv_exact(sock, ack, 1)
            t1 = time.perf_counter()
            sock.sendall(b"r")
            sock.sendall(out)
            recv_exact(sock, back, nbytes)
            t2 = time.perf_counter()
            if i:
                one_way.append(t1 - t0)
                round_trip.append(t2 - t1)
        sock.sendall(b"q")
    return {"one_way_s": one_way, "round_trip_s": round_trip}


# --- HTTP GET of a node's model ----------------------------------------------------------------------------


def read_all(resp: http.client.HTTPResponse, buf: bytearray) -> int:
    """Read the whole body into ``buf`` (grown if the body is larger); returns its length."""
    got = 0
    while True:
        if got == len(buf):
            buf.extend(bytes(max(1 << 20, len(buf) // 4)))
        with memoryview(buf) as view:
            k = resp.readinto(view[got : got + CHUNK])
        if not k:
            return got
        got += k


def http_get(port: int, path: str, nbytes: int, repeats: int) -> dict:
    """Time ``GET path`` read fully into memory (one warm-up first, not counted), on one kept-alive connection."""
    buf = bytearray(nbytes + (1 << 20))
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    times, sizes = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        n = read_all(resp, buf)
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status} {bytes(buf[: min(n, 300)])!r}")
        if i:
            times.append(dt)
            sizes.append(n)
    conn.close()
    return {"times_s": times, "body_bytes": max(sizes)}


# --- pickle / torch.save over HTTP ------------------------------------------------------------------------


def codec(fmt: str) -> tuple[Callable[[dict], bytes], Callable[[bytes], dict], Callable[[Any, Any], None]]:
    """(dumps, loads, average in place) of ``fmt``: pickle (numpy arrays) or torch (torch.save, tensors)."""
    if fmt == "pickle":

        def avg(a: np.ndarray, b: np.ndarray) -> None:
            np.add(a, b, out=a)
            a *= 0.5

        return (lambda s: pickle.dumps(s, protocol=5)), pickle.loads, avg
    import torch

    torch.set_num_threads(1)  # as a node (--torch-threads 1)

    def dumps(state: dict) -> bytes:
        f = io.BytesIO()
        torch.save(state, f)
        return f.getvalue()

    def loads(body: bytes) -> dict:
        return torch.load(io.BytesIO(body), weights_only=True)

    return dumps, loads, lambda a, b: a.add_(b).mul_(0.5)


def make_state(shapes: dict[str, list[int]], fmt: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(size=tuple(s), dtype=np.float32) for k, s in shapes.items()}
    if fmt == "torch":
        import torch

        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return state


def ser_server(port: int, fmt: str, shapes: dict[str, list[int]], nbytes: int) -> dict:
    """POST /exchange: unpickle the peer's state, reply with this one's (as it was), average into this one."""
    from aiohttp import web

    dumps, loads, avg = codec(fmt)
    state = make_state(shapes, fmt, seed=2)

    async def exchange(request: web.Request) -> web.Response:
        theirs = loads(await request.read())
        reply = dumps(state)
        for k, v in state.items():
            avg(v, theirs[k])
        return web.Response(body=reply, content_type="application/octet-stream")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=2 * nbytes + (16 << 20))
    app.router.add_post("/exchange", exchange)
    app.router.add_get("/ready", ready)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)
    return {}


def ser_client(port: int, fmt: str, shapes: dict[str, list[int]], repeats: int) -> dict:
    """Per repeat (after one warm-up): serialise, POST, read the reply, deserialise, average. Also this
    process's own peak RSS above its idle RSS (state built) over the timed exchanges."""
    dumps, loads, avg = codec(fmt)
    state = make_state(shapes, fmt, seed=1)
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    times: list[float] = []
    idle = size = 0
    cpu0 = 0.0
    for i in range(repeats + 1):
        if i == 1:
            idle = settle(os.getpid(), 0.1, 5)
            reset_peak(os.getpid())
            cpu0 = cpu_s(os.getpid())
        t0 = time.perf_counter()
        body = dumps(state)
        conn.request("POST", "/exchange", body=body, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        reply = resp.read()
        if resp.status != 200:
            raise SystemExit(f"POST /exchange: {resp.status} {reply[:300]!r}")
        theirs = loads(reply)
        for k, v in state.items():
            avg(v, theirs[k])
        dt = time.perf_counter() - t0
        size = len(body)
        del body, reply, theirs
        if i:
            times.append(dt)
    conn.close()
    hwm = mem(os.getpid())["VmHWM"]
    cpu = (cpu_s(os.getpid()) - cpu0) / repeats
    return {"times_s": times, "body_bytes": size, "client_idle_rss": idle, "client_peak_rss": hwm, "client_cpu_s": cpu}


ROLES: dict[str, Callable[..., dict]] = {
    "tcp-server": tcp_server,
    "tcp-client": tcp_client,
    "http-get": http_get,
    "ser-server": ser_server,
    "ser-client": ser_client,
}

if __name__ == "__main__":
    result = ROLES[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)

"""Benchmark of liveness under faults (issue 11): three pure-averaging node processes on loopback, one
paused with SIGSTOP for 30 s; three more where one link loses replies; and one node asked to stop
(SIGTERM) while a client is stuck mid-upload.

For each version (this checkout, and optionally a reference checkout, e.g. v0.1) it measures:
  - the committed exchanges per second of the two healthy nodes before and during the pause, and of
    the paused node after it resumes;
  - how far the network mean moved (pure averaging conserves it: it must not move) once the paused
    node is back, read at a moment when no exchange is under way;
  - the same drift after a minute in which one link (n0 to n1, through a proxy) loses a share of the
    replies after the request reached n1: an exchange that happens on one side only moves the mean;
  - how long a node takes to exit after SIGTERM with one unfinished upload.
Writes benchmarks/results/faults.md (table) and faults.png (exchange rate over time).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/faults.py
    # against v0.1 (commit 72121e0), in a worktree and a venv that sees the same packages but not this
    # checkout's editable install:
    git worktree add /tmp/gossipfl-v01 72121e0
    python3 -m venv /tmp/venv-old
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/venv-old/lib/python3.11/site-packages/main.pth
    .venv/bin/python benchmarks/faults.py --reference /tmp/gossipfl-v01 --reference-python /tmp/venv-old/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from gossipfl.learning.learner import build_seeded, gossiped_tensors
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.protocol.consensus import flatten

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Version:
    name: str
    python: str
    src: Path  # the checkout whose gossipfl runs (the nodes start there, with it on PYTHONPATH)


@dataclass
class Node:
    port: int
    proc: subprocess.Popen
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 1.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def status(self, timeout: float = 1.0) -> dict:
        return json.loads(self.get("/v1/status", timeout))


def committed(status: dict) -> int:
    ex = status["exchanges"]
    return ex["ok"] + ex["served"] + ex.get("late", 0)


def params_of(payload: bytes) -> np.ndarray:
    """The parameters in a /v1/model payload, of either protocol version (no version check here)."""
    obj = msgpack.unpackb(payload, raw=False)
    return flatten(
        {k: np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for k, t in obj["params"].items()}
    )


def quiet(status: dict) -> bool:
    ex = status["exchanges"]
    return not (ex.get("in_flight") or ex.get("prepared") or ex.get("doubtful"))


def consistent_models(nodes: list[Node], timeout: float = 30.0) -> list[np.ndarray]:
    """Models read while no exchange is under way: statuses, models, statuses again, kept only if nothing
    was in flight before and after and no node merged in between (v0.1 reports neither, so its reading
    is taken as it comes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [n.status() for n in nodes]
        if all(quiet(s) for s in before):
            models = [params_of(n.get("/v1/model", 5.0)) for n in nodes]
            after = [n.status() for n in nodes]
            if all(quiet(s) for s in after) and [s.get("merges") for s in before] == [s.get("merges") for s in after]:
                return models
        time.sleep(0.02)
    raise TimeoutError("no quiet moment")


def start(version: Version, ports: list[int], i: int, interval: float, cluster: str, log: Path) -> Node:
    seeds = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i)
    cmd = [version.python, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(ports[i]), "--id", f"n{i}"]
    cmd += ["--cluster", cluster, "--no-train", "--seed", str(i), "--gossip-interval", str(interval)]
    cmd += ["--discovery", "static", "--seeds", seeds, "--mdns-interface", "127.0.0.1"]
    env = {**os.environ, "PYTHONPATH": str(version.src)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=version.src)
    return Node(ports[i], proc)


def sample(nodes: list[Node], t0: float, seconds: float, every: float = 1.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for n in nodes:
            try:
                n.samples.append((time.monotonic() - t0, committed(n.status(timeout=0.5))))
            except OSError:
                pass  # paused: no answer
        time.sleep(every)


def rate(node: Node, start: float, end: float) -> float:
    pts = [(t, c) for t, c in node.samples if start <= t <= end]
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]) if len(pts) >= 2 else float("nan")


def pause_run(version: Version, args: argparse.Namespace, workdir: Path) -> dict:
    ports = [free_port() for _ in range(3)]
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    nodes = [
        start(version, ports, i, args.gossip_interval, cluster, workdir / f"{version.name}-n{i}.log") for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if all(len(n.status()["peers"]) == 2 for n in nodes):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("nodes did not find each other")
            time.sleep(0.2)
        t0 = time.monotonic()
        sample(nodes, t0, args.before)
        os.kill(nodes[2].proc.pid, signal.SIGSTOP)
        sample(nodes, t0, args.pause)
        os.kill(nodes[2].proc.pid, signal.SIGCONT)
        sample(nodes, t0, args.after)
        models = consistent_models(nodes)
        mean0 = np.mean([flatten({k: v.detach().numpy() for k, v in gossiped_tensors(
            build_seeded(DigitsTask().build_model, i)).items()}) for i in range(3)], axis=0)  # fmt: skip
        drift = float(np.linalg.norm(np.mean(models, axis=0) - mean0) / np.linalg.norm(mean0))
        b, p, a = args.before, args.before + args.pause, args.before + args.pause + args.after
        out = {
            "before": [rate(n, 2, b) for n in nodes[:2]],
            "during": [rate(n, b + 3, p) for n in nodes[:2]],  # from 3 s in: the peers have found out
            "paused_after": rate(nodes[2], p + 3, a),
            "paused_before": rate(nodes[2], 2, b),
            "drift": drift,
            "samples": {f"n{i}": n.samples for i, n in enumerate(nodes)},
        }
    finally:
        codes = []
        for n in nodes:
            os.kill(n.proc.pid, signal.SIGCONT)
            n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            try:
                codes.append(n.proc.wait(30))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                codes.append(None)
    out["exit_codes"] = codes
    return out


class LossyProxy:
    """Forwards HTTP to ``target``; a share ``loss`` of the replies to POSTs is held back (the request
    reached the target, which acted on it; the caller times out): a link that loses packets one way."""

    def __init__(self, target: str, loss: float, hold: float, seed: int = 0) -> None:
        self.target, self.loss, self.hold = target, loss, hold
        self.rng = random.Random(seed)
        self.port = free_port()
        self.lost = self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> LossyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:

            async def forward(request: web.Request) -> web.Response:
                body = await request.read()
                headers = {"Content-Type": request.content_type}
                url = self.target + request.path_qs
                try:
                    async with session.request(request.method, url, data=body, headers=headers) as r:
                        reply, status, ctype = await r.read(), r.status, r.content_type
                except aiohttp.ClientError:
                    return web.Response(status=502)  # the target is gone (the run is ending)
                self.forwarded += 1
                if request.method == "POST" and self.rng.random() < self.loss:
                    self.lost += 1
                    await asyncio.sleep(self.hold)
                return web.Response(status=status, body=reply, content_type=ctype)

            app = web.Application(client_max_size=1 << 26)
            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()


def lossy_run(version: Version, args: argparse.Namespace, workdir: Path) -> dict:
    """n0 reaches n1 through a proxy that loses ``args.loss`` of the replies; n1 starts no exchange of its
    own (so n0's route to it stays the proxy); n2 gossips with both directly."""
    ports = [free_port() for _ in range(3)]
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    with LossyProxy(f"http://127.0.0.1:{ports[1]}", args.loss, hold=12.0) as proxy:
        seeds = {
            0: [f"127.0.0.1:{proxy.port}", f"127.0.0.1:{ports[2]}"],
            1: [],
            2: [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"],
        }
        nodes = []
        for i in range(3):
            interval = 3600.0 if i == 1 else args.gossip_interval
            cmd = [version.python, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", str(ports[i])]
            cmd += [
                "--id",
                f"n{i}",
                "--cluster",
                cluster,
                "--no-train",
                "--seed",
                str(i),
                "--mdns-interface",
                "127.0.0.1",
            ]
            cmd += ["--gossip-interval", str(interval), "--discovery", "static"]
            cmd += ["--seeds", ",".join(seeds[i])] if seeds[i] else []
            env = {**os.environ, "PYTHONPATH": str(version.src)}
            log = (workdir / f"{version.name}-lossy-n{i}.log").open("w")
            nodes.append(
                Node(ports[i], subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=version.src))
            )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if len(nodes[0].status()["peers"]) == 2:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("n0 did not find its peers")
                time.sleep(0.2)
            time.sleep(args.lossy_duration)
            time.sleep(13.0)  # replies the proxy still holds come back (to no one)
            models = consistent_models(nodes)
            mean0 = np.mean([flatten({k: v.detach().numpy() for k, v in gossiped_tensors(
                build_seeded(DigitsTask().build_model, i)).items()}) for i in range(3)], axis=0)  # fmt: skip
            drift = float(np.linalg.norm(np.mean(models, axis=0) - mean0) / np.linalg.norm(mean0))
            done = [committed(n.status()) for n in nodes]
        finally:
            for n in nodes:
                n.proc.send_signal(signal.SIGTERM)
            for n in nodes:
                try:
                    n.proc.wait(30)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
    return {"drift": drift, "lost": proxy.lost, "forwarded": proxy.forwarded, "committed": done}


def stuck_upload_run(version: Version, workdir: Path) -> float | None:
    """Seconds from SIGTERM to exit while a client is stuck mid-upload (None: not within 90 s)."""
    port = free_port()
    node = start(version, [port], 0, 1.0, f"bench-{uuid.uuid4().hex[:8]}", workdir / f"{version.name}-stop.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                node.status()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n" + b"\x80" * 100)
        time.sleep(0.5)
        t = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(90)
            return time.monotonic() - t
        except subprocess.TimeoutExpired:
            return None
        finally:
            s.close()
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "# Liveness under faults",
        "",
        f"`python benchmarks/faults.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Three pure-averaging node processes on 127.0.0.1 (digits model, static seeds, gossip every "
        f"{args.gossip_interval:g} s); node n2 is paused with SIGSTOP for {args.pause:g} s after "
        f"{args.before:g} s, then runs {args.after:g} s more. Rates are committed exchanges (started or "
        "answered) per second of each node, from its `/v1/status`. The mean drift is the distance between "
        "the network's mean model at the end and at the start, relative to its norm: pure averaging "
        "conserves the mean, so anything above float rounding is an exchange that happened on one side "
        f"only. Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
        "| version | n0, n1 before (exchanges/s) | n0, n1 during the pause | during / before | n2 before, after "
        "| mean drift after | exit codes | exit after SIGTERM, client stuck mid-upload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lossy_rows = []
    for name, r in results.items():
        p = r["pause"]
        ratio = min(d / b for d, b in zip(p["during"], p["before"], strict=True))
        stop = r["stuck_upload_s"]
        lines.append(
            f"| {name} | {p['before'][0]:.2f}, {p['before'][1]:.2f} | {p['during'][0]:.2f}, {p['during'][1]:.2f} "
            f"| {ratio:.2f} | {p['paused_before']:.2f}, {p['paused_after']:.2f} | {p['drift']:.1e} "
            f"| {p['exit_codes']} | {'more than 90 s' if stop is None else f'{stop:.1f} s'} |"
        )
        if "lossy" in r:
            q = r["lossy"]
            done = ", ".join(map(str, q["committed"]))
            lossy_rows.append(f"| {name} | {q['forwarded']} | {q['lost']} | {done} | {q['drift']:.1e} |")
    if lossy_rows:
        lines += [
            "",
            f"A lossy link: for {args.lossy_duration:g} s, n0 reaches n1 through a proxy that holds back "
            f"{args.loss:.0%} of the replies to POSTs after n1 got the request (n0 gives up waiting); n1 starts "
            "no exchange itself, n2 gossips with both directly. Then the drift of the network mean, as above.",
            "",
            "| version | requests through the proxy | replies lost | committed exchanges n0, n1, n2 | mean drift |",
            "|---|---|---|---|---|",
            *lossy_rows,
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        for node, pts in r["pause"]["samples"].items():
            t = np.array([p[0] for p in pts])
            c = np.array([p[1] for p in pts])
            if len(t) > 5:
                w = 5
                rate = (c[w:] - c[:-w]) / (t[w:] - t[:-w])
                gap = np.maximum.reduce([np.diff(t)[i : len(t) - w + i] for i in range(w)])
                rate[gap > 3.0] = np.nan  # no line across a stretch without samples (a paused node)
                ax.plot(t[w:], rate, label=node)
        ax.axvspan(args.before, args.before + args.pause, color="0.9", label="n2 paused (SIGSTOP)")
        ax.set_title(name)
        ax.set_xlabel("seconds")
    axes[0][0].set_ylabel("committed exchanges / s (5 s window)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pause", type=float, default=30.0)
    ap.add_argument("--before", type=float, default=30.0)
    ap.add_argument("--after", type=float, default=30.0)
    ap.add_argument("--gossip-interval", type=float, default=1.0)
    ap.add_argument("--loss", type=float, default=0.5, help="share of replies the lossy link loses")
    ap.add_argument("--lossy-duration", type=float, default=90.0, help="seconds of the lossy-link run (0: skip)")
    ap.add_argument("--reference", type=Path, help="another checkout to measure the same way (e.g. v0.1)")
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--reference-name", default="v0.1 (72121e0)")
    ap.add_argument("--name", default="faults")
    ap.add_argument("--replot", action="store_true", help="redraw NAME.png and NAME.md from NAME.json")
    args = ap.parse_args()
    if args.replot:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        plot(results, args, RESULTS / f"{args.name}.png")
        return
    versions = [Version("this checkout", sys.executable, ROOT)]
    if args.reference:
        versions.append(Version(args.reference_name, args.reference_python, args.reference.resolve()))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in versions:
            print(f"{v.name}: pausing one of three nodes...", flush=True)
            results[v.name] = {"pause": pause_run(v, args, Path(tmp))}
            if args.lossy_duration > 0:
                print(f"{v.name}: a lossy link...", flush=True)
                results[v.name]["lossy"] = lossy_run(v, args, Path(tmp))
            print(f"{v.name}: SIGTERM with a stuck upload...", flush=True)
            results[v.name]["stuck_upload_s"] = stuck_upload_run(v, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    text = report(results, args)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    plot(results, args, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()

"""Local testbed: N nodes on 127.0.0.1 with mDNS confined to loopback, watched over HTTP.

Two ways to run the nodes, behind one small interface (``Launcher``):

- ``process`` (default): one ``gossipfl node`` process per node, stopped with SIGTERM;
- ``inproc``: all nodes in this process, on one event loop with one shared loopback AsyncZeroconf,
  one HTTP server each, torch on one thread and a small worker pool for the nodes' blocking work
  (cheap enough for 64 nodes on a 2-core machine).

Both are measured the same way: every sample interval the testbed reads each node's /v1/status and
/v1/model over HTTP, records accuracy and the consensus distance (how far the models are from their
mean), and draws a live table. At the end it stops the nodes and writes ``results.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import secrets
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import aiohttp
import numpy as np

from . import wire
from .consensus import consensus_distance, flatten, network_mean
from .learning.learner import build_seeded, gossiped_tensors
from .learning.registry import get_task
from .logs import ROOT as LOG_ROOT
from .logs import setup_logging

if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncZeroconf

    from .node import Node

LOOPBACK = "127.0.0.1"
MODES = ("process", "inproc")
READY_TIMEOUT_S = 90.0
DISCOVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TestbedOptions:
    nodes: int = 8
    duration: float = 60.0
    out: str = "results/testbed"
    no_train: bool = False
    gossip_interval: float = 1.0
    sample_interval: float = 1.0
    task: str = "digits"
    data: str | None = None  # --data of every node (tabular or a user's task): one file, cut by --partition
    seed: int = 0
    live: bool = True
    extra_node_args: tuple[str, ...] = ()
    mode: str = "process"  # one of MODES
    inproc_workers: int = 0  # inproc: threads of the loop's default executor; 0 picks inproc_workers()


@dataclass
class WatchedNode:
    """A node as the testbed watches it: over HTTP only, whatever runs it."""

    index: int
    id: str
    url: str = ""
    accuracy: list[tuple[float, float | None]] = field(default_factory=list)
    loss: list[tuple[float, float | None]] = field(default_factory=list)
    bytes_sent: list[tuple[float, int]] = field(default_factory=list)
    last_status: dict[str, Any] = field(default_factory=dict)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_args(opts: TestbedOptions, index: int, node_id: str, port: int, cluster: str) -> list[str]:
    """The ``gossipfl node`` options of node ``index``: the command line in process mode, parsed by the
    same parser into a NodeConfig in inproc mode."""
    args = [
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--id",
        node_id,
        "--mdns-interface",
        LOOPBACK,
        "--task",
        opts.task,
        "--partition",
        f"{index}/{opts.nodes}",
        "--seed",
        str(opts.seed + index),
        "--gossip-interval",
        str(opts.gossip_interval),
        "--cluster",  # a run of its own: other testbeds or nodes on this host stay out
        cluster,
    ]
    if opts.data is not None:
        args += ["--data", opts.data]
    if opts.no_train:
        args.append("--no-train")
    return args + list(opts.extra_node_args)


def node_command(opts: TestbedOptions, index: int, node_id: str, port: int, cluster: str) -> list[str]:
    return [sys.executable, "-m", "gossipfl", "node", *node_args(opts, index, node_id, port, cluster)]


async def _status(session: aiohttp.ClientSession, node: WatchedNode) -> dict | None:
    try:
        async with session.get(node.url + "/v1/status") as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def wait_ready(session: aiohttp.ClientSession, nodes: list[WatchedNode], launcher: Launcher) -> bool:
    """Wait until every node answers HTTP, then (up to a limit) until each has found all the others.

    Returns whether discovery completed; raises when a node dies or never answers."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(nodes)
    while pending:
        launcher.check()
        statuses = await asyncio.gather(*(_status(session, n) for n in pending))
        pending = [n for n, st in zip(pending, statuses, strict=True) if st is None]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"nodes not ready after {READY_TIMEOUT_S:.0f} s: {[n.id for n in pending]}")
        if pending:
            await asyncio.sleep(0.3)
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = await asyncio.gather(*(_status(session, n) for n in nodes))
        if all(st is not None and len(st.get("peers", [])) >= len(nodes) - 1 for st in statuses):
            return True
        await asyncio.sleep(0.2)
    return False


async def sample(
    session: aiohttp.ClientSession, nodes: list[WatchedNode], spec: wire.ModelSpec, t: float
) -> tuple[dict, np.ndarray | None]:
    """Read every node's status and model; return one row of the time series and the network mean."""

    async def one(n: WatchedNode) -> np.ndarray | None:
        try:
            async with session.get(n.url + "/v1/status") as r:
                n.last_status = await r.json()
            async with session.get(n.url + "/v1/model") as r:
                body = await r.read()
            metrics = n.last_status.get("metrics", {})
            n.accuracy.append((t, metrics.get("accuracy")))
            n.loss.append((t, metrics.get("loss")))
            n.bytes_sent.append((t, int(n.last_status.get("exchanges", {}).get("bytes_sent", 0))))
            return flatten(wire.decode(body, spec).params)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    vectors = [v for v in await asyncio.gather(*(one(n) for n in nodes)) if v is not None]
    accs = [n.accuracy[-1][1] for n in nodes if n.accuracy and n.accuracy[-1][1] is not None]
    row = {
        "t": round(t, 3),
        "consensus_distance": consensus_distance(vectors) if len(vectors) > 1 else None,
        "mean_norm": float(np.linalg.norm(network_mean(vectors))) if vectors else None,
        "nodes_sampled": len(vectors),
        "accuracy_mean": float(np.mean(accs)) if accs else None,
        "accuracy_min": float(np.min(accs)) if accs else None,
    }
    return row, (network_mean(vectors) if vectors else None)


def render(nodes: list[WatchedNode], row: dict, duration: float) -> str:
    cd = row["consensus_distance"]
    lines = [
        f"t={row['t']:5.1f}/{duration:.0f}s  consensus distance={cd:.3e}" if cd is not None else f"t={row['t']:.1f}s",
        f"{'node':<16} {'accuracy':>8} {'loss':>7} {'age':>6} {'peers':>5} {'ok':>5} {'fail':>4} {'busy':>4}",
    ]
    for n in nodes:
        s = n.last_status
        m, ex = s.get("metrics", {}), s.get("exchanges", {})
        acc = f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "-"
        loss = f"{m['loss']:.3f}" if m.get("loss") is not None else "-"
        lines.append(
            f"{n.id:<16} {acc:>8} {loss:>7} {s.get('age', 0):>6} {len(s.get('peers', [])):>5} "
            f"{ex.get('ok', 0):>5} {ex.get('failed', 0):>4} {ex.get('busy', 0):>4}"
        )
    return "\n".join(lines)


class Launcher(Protocol):
    """What differs between the modes: starting the nodes, noticing one died, stopping them."""

    mode: str
    where: str  # where the node logs go, for the start-up line

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        """Start one node per id (node i gets shard i); return them once launched."""
        ...

    def check(self) -> None:
        """Raise RuntimeError naming a node that has died (called while waiting for start-up)."""
        ...

    async def stop(self) -> dict[str, int | None]:
        """Stop every node; node id -> exit code (0: clean, None: did not stop in time)."""
        ...

    def resources(self) -> dict[str, Any]:
        """CPU time and peak memory of the run, measured after stop()."""
        ...


def _rss_mib(ru_maxrss: int) -> float:
    return round(ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class ProcessLauncher:
    """One ``gossipfl node`` process per node, logging to OUT/<id>.log, stopped with SIGTERM."""

    mode = "process"

    def __init__(self, opts: TestbedOptions, out: Path) -> None:
        self.opts = opts
        self.out = out
        self.where = f"logs in {out}/"
        self._procs: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        nodes = []
        for i, (node_id, port) in enumerate(zip(ids, free_ports(len(ids)), strict=True)):
            log_path = self.out / f"{node_id}.log"
            with open(log_path, "wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    *node_command(self.opts, i, node_id, port, cluster),
                    stdout=log_file,
                    stderr=log_file,
                    stdin=asyncio.subprocess.DEVNULL,
                    env=env,
                )
            self._procs[node_id] = (proc, log_path)
            nodes.append(WatchedNode(i, node_id, url=f"http://{LOOPBACK}:{port}"))
        return nodes

    def check(self) -> None:
        for node_id, (proc, log_path) in self._procs.items():
            if proc.returncode is not None:
                raise RuntimeError(f"{node_id} exited with code {proc.returncode} during start-up; see {log_path}")

    async def stop(self) -> dict[str, int | None]:
        for proc, _ in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)

        async def wait(proc: asyncio.subprocess.Process) -> int | None:
            try:
                return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return None  # did not stop in time

        codes = await asyncio.gather(*(wait(proc) for proc, _ in self._procs.values()))
        return dict(zip(self._procs, codes, strict=True))

    def resources(self) -> dict[str, Any]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "cpu_user_s": round(own.ru_utime + kids.ru_utime, 2),
            "cpu_system_s": round(own.ru_stime + kids.ru_stime, 2),
            "peak_rss_mib": _rss_mib(kids.ru_maxrss),
            "scope": "CPU: the testbed and all node processes; peak RSS: the largest node process",
        }


class InprocLauncher:
    """All nodes in this process: one event loop, one shared AsyncZeroconf on 127.0.0.1, one HTTP server
    per node, torch on one thread, and a thread pool of ``inproc_workers()`` threads as the loop's default
    executor (nodes train, evaluate and merge with ``asyncio.to_thread``). Node logs go to OUT/nodes.log."""

    mode = "inproc"

    def __init__(self, opts: TestbedOptions, out: Path) -> None:
        self.opts = opts
        self.out = out
        self.where = f"in this process, log in {out / 'nodes.log'}"
        self._ids: list[str] = []
        self.workers = 0
        self._nodes: list[Node] = []
        self._zc: AsyncZeroconf | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._log: IO[str] | None = None
        self._saved_logging: tuple[list[logging.Handler], int, bool] | None = None

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        import torch

        from .cli import node_config_from_args
        from .discovery import make_zeroconf
        from .node import Node

        # the same options a node process would get, through the same parser; a bad one (ConfigError)
        # stops the testbed before anything starts
        configs = [node_config_from_args(node_args(self.opts, i, node_id, 0, cluster)) for i, node_id in enumerate(ids)]
        self._ids = list(ids)
        torch.set_num_threads(1)
        _raise_fd_limit(2 * len(ids) ** 2 + 8 * len(ids) + 256)  # each pair may keep a connection, two ends
        self.workers = self.opts.inproc_workers or inproc_workers(len(ids))
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="gossipfl-node")
        asyncio.get_running_loop().set_default_executor(self._pool)
        self._redirect_logging(configs[0].log_format, configs[0].log_level)
        self._zc = make_zeroconf([LOOPBACK])
        self._nodes = [Node(c, zeroconf=self._zc) for c in configs]
        started = await asyncio.gather(*(n.start() for n in self._nodes), return_exceptions=True)
        for node_id, r in zip(ids, started, strict=True):
            if isinstance(r, BaseException):
                raise RuntimeError(f"{node_id} could not start: {r}; see {self.out / 'nodes.log'}")
        return [WatchedNode(i, n.id, url=n.url) for i, n in enumerate(self._nodes)]

    def check(self) -> None:
        failed = [n for n in self._nodes if n.failure is not None]
        if failed:
            raise RuntimeError(f"{failed[0].id} failed: {failed[0].failure}; see {self.out / 'nodes.log'}")

    async def stop(self) -> dict[str, int | None]:
        async def stop_one(node: Node) -> int | None:
            try:
                await asyncio.wait_for(node.stop(), STOP_TIMEOUT_S)
            except TimeoutError:
                return None  # did not stop in time
            except Exception:
                logging.getLogger(LOG_ROOT).exception("stopping a node failed")
                return 1
            return node.exit_code

        codes = await asyncio.gather(*(stop_one(n) for n in self._nodes))
        if self._zc is not None:
            await self._zc.async_close()
        self._restore_logging()
        if self._pool is not None:
            await asyncio.get_running_loop().shutdown_default_executor()  # joins the pool's threads
        return dict(zip(self._ids, codes, strict=True))

    def resources(self) -> dict[str, Any]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_user_s": round(own.ru_utime, 2),
            "cpu_system_s": round(own.ru_stime, 2),
            "peak_rss_mib": _rss_mib(own.ru_maxrss),
            "workers": self.workers,
            "scope": "this process: all nodes and the testbed's own sampling",
        }

    def _redirect_logging(self, fmt: str, level: str) -> None:
        root = logging.getLogger(LOG_ROOT)
        self._saved_logging = (root.handlers[:], root.level, root.propagate)
        self._log = open(self.out / "nodes.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        setup_logging(fmt, level, stream=self._log)

    def _restore_logging(self) -> None:
        if self._saved_logging is not None:
            root = logging.getLogger(LOG_ROOT)
            root.handlers[:], level, root.propagate = self._saved_logging
            root.setLevel(level)
            self._saved_logging = None
        if self._log is not None:
            self._log.close()
            self._log = None


def inproc_workers(nodes: int) -> int:
    """Default size of the inproc worker pool: a few more threads than cores, at most N+4.

    The nodes' blocking calls (a training round, an evaluation, a snapshot or a merge) are short and
    mostly hold the GIL, so threads beyond the cores only contend: with 64 nodes on 2 cores, 4 threads
    gave each node 526 training steps in a 30 s run and 36 ms exchanges, 68 threads (N+4) 294 to 307
    steps and 130 ms exchanges, and twice the CPU time spent in the kernel."""
    return max(1, min(nodes + 4, (os.cpu_count() or 1) + 2))


def _raise_fd_limit(wanted: int) -> None:
    """Best effort: N nodes in one process hold about 2 N^2 sockets; raise the soft limit towards that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )
    except (ValueError, OSError):
        pass


def make_launcher(opts: TestbedOptions, out: Path) -> Launcher:
    if opts.mode == "process":
        return ProcessLauncher(opts, out)
    if opts.mode == "inproc":
        return InprocLauncher(opts, out)
    raise ValueError(f"testbed mode {opts.mode!r}: expected one of {', '.join(MODES)}")


def summarize(
    nodes: list[WatchedNode],
    series: list[dict],
    opts: TestbedOptions,
    exit_codes: dict,
    *,
    startup_s: float | None = None,
    resources: dict[str, Any] | None = None,
) -> dict:
    final = {}
    for n in nodes:
        s = n.last_status
        final[n.id] = {
            "accuracy": s.get("metrics", {}).get("accuracy"),
            "loss": s.get("metrics", {}).get("loss"),
            "age": s.get("age"),
            "steps": s.get("steps"),
            "samples": s.get("samples"),
            "peers": len(s.get("peers", [])),
            "exchanges": s.get("exchanges"),
            "merge": s.get("merge"),
            "exit_code": exit_codes.get(n.id),
        }
    accs = [f["accuracy"] for f in final.values() if f["accuracy"] is not None]
    first = next((r for r in series if r["consensus_distance"] is not None), None)
    last = series[-1] if series else None
    return {
        "mode": opts.mode,
        "options": asdict(opts),
        "nodes": {
            n.id: {
                "url": n.url,
                "partition": f"{n.index}/{opts.nodes}",
                "accuracy": n.accuracy,
                "loss": n.loss,
                "bytes_sent": n.bytes_sent,
            }
            for n in nodes
        },
        "consensus": series,
        "final": final,
        "summary": {
            "accuracy_mean": float(np.mean(accs)) if accs else None,
            "accuracy_min": float(np.min(accs)) if accs else None,
            "accuracy_max": float(np.max(accs)) if accs else None,
            "accuracy_spread": float(np.max(accs) - np.min(accs)) if accs else None,
            "consensus_distance_first": first["consensus_distance"] if first else None,
            "consensus_distance_last": last["consensus_distance"] if last else None,
            # the spread as a fraction of the size of the model: nodes that train from one shared initial
            # model start close, so this, not the first-to-last ratio, says whether gossip holds them together
            "consensus_distance_relative_last": relative(last),
            # only meaningful for pure averaging: training moves the mean on purpose
            "mean_shift_relative": series[-1].get("mean_shift_relative") if series and opts.no_train else None,
            "all_exited_cleanly": all(c == 0 for c in exit_codes.values()),
            "startup_s": round(startup_s, 3) if startup_s is not None else None,
        },
        "resources": resources,
    }


def relative(row: dict | None) -> float | None:
    """Consensus distance over the norm of the network mean (None when either is missing or zero)."""
    if not row or row.get("consensus_distance") is None or not row.get("mean_norm"):
        return None
    return row["consensus_distance"] / row["mean_norm"]


def final_table(result: dict) -> str:
    lines = [f"{'node':<16} {'accuracy':>8} {'loss':>7} {'exchanges ok':>12} {'exit':>4}"]
    for node_id, f in result["final"].items():
        acc = f"{f['accuracy']:.4f}" if f["accuracy"] is not None else "-"
        loss = f"{f['loss']:.3f}" if f["loss"] is not None else "-"
        ok = (f["exchanges"] or {}).get("ok", 0)
        lines.append(f"{node_id:<16} {acc:>8} {loss:>7} {ok:>12} {f['exit_code']!s:>4}")
    s = result["summary"]
    if s["accuracy_mean"] is not None:
        lines.append(
            f"accuracy mean {s['accuracy_mean']:.4f}  min {s['accuracy_min']:.4f}  "
            f"max {s['accuracy_max']:.4f}  spread {s['accuracy_spread']:.4f}"
        )
    if s["consensus_distance_first"] is not None and s["consensus_distance_last"] is not None:
        rel = s.get("consensus_distance_relative_last")
        share = f" ({100 * rel:.2g}% of the mean model's norm)" if rel is not None else ""
        lines.append(
            f"consensus distance {s['consensus_distance_first']:.3e} -> {s['consensus_distance_last']:.3e}{share}"
        )
    return "\n".join(lines)


async def run_testbed(opts: TestbedOptions) -> int:
    t_launch = time.monotonic()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(opts, out)
    task = get_task(opts.task, opts.data)
    model = build_seeded(task.build_model, 0)
    spec = wire.spec_of({k: v.detach().numpy() for k, v in gossiped_tensors(model).items()})
    tag = secrets.token_hex(2)
    ids = [f"node{i}-{tag}" for i in range(opts.nodes)]
    nodes: list[WatchedNode] = []
    series: list[dict] = []
    exit_codes: dict[str, int | None] = {}
    startup_s = None
    tty = sys.stdout.isatty() and opts.live
    failure = None
    try:
        nodes = await launcher.start(ids, f"testbed-{tag}")
        print(
            f"testbed: started {opts.nodes} nodes ({opts.task}, {launcher.where}), waiting for them to be up...",
            flush=True,
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            found = await wait_ready(session, nodes, launcher)
            startup_s = time.monotonic() - t_launch
            if found:
                print(
                    f"testbed: all {opts.nodes} nodes up and know each other after {startup_s:.1f} s; "
                    f"running for {opts.duration:g} s",
                    flush=True,
                )
            else:
                print(
                    f"testbed: all {opts.nodes} nodes up, but not all found each other in "
                    f"{DISCOVERY_TIMEOUT_S:.0f} s; running for {opts.duration:g} s anyway",
                    flush=True,
                )
            t0 = time.monotonic()
            mean0 = None
            last_print = -1e9
            while True:
                t = time.monotonic() - t0
                row, mean = await sample(session, nodes, spec, t)
                if mean0 is None and mean is not None:
                    mean0 = mean
                if mean is not None and mean0 is not None:
                    row["mean_shift_relative"] = float(np.linalg.norm(mean - mean0) / np.linalg.norm(mean0))
                series.append(row)
                if opts.live and (tty or t - last_print >= 5.0):
                    text = render(nodes, row, opts.duration)
                    print(("\x1b[H\x1b[2J" if tty else "\n") + text, flush=True)
                    last_print = t
                if t >= opts.duration:
                    break
                await asyncio.sleep(max(0.0, opts.sample_interval - (time.monotonic() - t0 - t)))
    except RuntimeError as e:  # a node died or never came up
        failure = str(e)
    finally:
        exit_codes = await launcher.stop()
    if failure:
        print(f"testbed: error: {failure}", file=sys.stderr)
        return 1
    resources = {"mode": opts.mode, "wall_s": round(time.monotonic() - t_launch, 2), **launcher.resources()}
    result = summarize(nodes, series, opts, exit_codes, startup_s=startup_s, resources=resources)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("\n" + final_table(result))
    if opts.mode == "inproc":
        r = resources
        print(
            f"testbed: {opts.nodes} nodes in one process ({r['workers']} worker threads): "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, CPU {r['cpu_user_s'] + r['cpu_system_s']:.1f} s "
            f"(user {r['cpu_user_s']:.1f}, system {r['cpu_system_s']:.1f}) in {r['wall_s']:.1f} s wall"
        )
    print(f"testbed: results in {out / 'results.json'}")
    bad = {k: v for k, v in exit_codes.items() if v != 0}
    if bad:
        print(f"testbed: nodes did not exit cleanly: {bad}", file=sys.stderr)
        return 1
    return 0

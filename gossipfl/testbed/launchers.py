"""Running the nodes, behind one small interface (``Launcher``): one ``gossipfl node`` process per node,
or all nodes in this process on one event loop with one shared loopback AsyncZeroconf."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gossipfl.common.logs import ROOT as LOG_ROOT
from gossipfl.common.logs import setup_logging
from gossipfl.testbed.options import (
    LOOPBACK,
    STOP_TIMEOUT_S,
    TestbedOptions,
    WatchedNode,
    free_ports,
    node_args,
    node_command,
)

if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncZeroconf

    from gossipfl.node import Node


def _rss_mib(ru_maxrss: int) -> float:
    return round(ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class ProcessLauncher:
    """One ``gossipfl node`` process per node, each a fresh interpreter, logging to OUT/<id>.log, stopped
    with SIGTERM."""

    mode = "process"
    spawn = "exec"

    def __init__(self, opts: TestbedOptions, out: Path) -> None:
        self.opts = opts
        self.out = out
        self.where = f"logs in {out}/"
        self._procs: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}

    def _plan(self, ids: list[str]) -> list[tuple[int, str, int, Path]]:
        """(index, id, port, log file) of each node; ``_watched`` gives the testbed's view of them."""
        ports = free_ports(len(ids))
        return [
            (i, node_id, port, self.out / f"{node_id}.log")
            for i, (node_id, port) in enumerate(zip(ids, ports, strict=True))
        ]

    @staticmethod
    def _watched(plan: list[tuple[int, str, int, Path]]) -> list[WatchedNode]:
        return [WatchedNode(i, node_id, url=f"http://{LOOPBACK}:{port}") for i, node_id, port, _ in plan]

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        plan = self._plan(ids)
        for i, node_id, port, log_path in plan:
            with open(log_path, "wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    *node_command(self.opts, i, node_id, port, cluster),
                    stdout=log_file,
                    stderr=log_file,
                    stdin=asyncio.subprocess.DEVNULL,
                    env=env,
                )
            self._procs[node_id] = (proc, log_path)
        return self._watched(plan)

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
            "spawn": self.spawn,
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

        from gossipfl.args import node_config_from_args
        from gossipfl.discovery.mdns import make_zeroconf
        from gossipfl.node import Node

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
        self._saved_top = logging.getLogger().handlers[:]  # setup_logging adds one for the other libraries
        self._log = open(self.out / "nodes.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        setup_logging(fmt, level, stream=self._log)

    def _restore_logging(self) -> None:
        if self._saved_logging is not None:
            root = logging.getLogger(LOG_ROOT)
            root.handlers[:], level, root.propagate = self._saved_logging
            root.setLevel(level)
            logging.getLogger().handlers[:] = self._saved_top
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

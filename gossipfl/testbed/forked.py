"""The process testbed's default launcher: node processes forked from a zygote (``zygote.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gossipfl.testbed.launchers import ProcessLauncher
from gossipfl.testbed.options import STOP_TIMEOUT_S, TestbedOptions, WatchedNode, node_args


class ForkedProcessLauncher(ProcessLauncher):
    """One process per node, forked from a zygote that imported torch and the node's modules once
    (``zygote.py``); otherwise as ProcessLauncher: each runs ``python -m gossipfl node ...``, logs to
    OUT/<id>.log, is stopped with SIGTERM and gives its exit code (reported by the zygote, which reaps
    them; if the zygote itself dies, the nodes are still stopped, but their exit codes are unknown)."""

    spawn = "fork"
    FORK_TIMEOUT_S = 60.0  # the zygote imports torch before it forks: seconds, not a minute

    def __init__(self, opts: TestbedOptions, out: Path) -> None:
        super().__init__(opts, out)
        self._zygote: asyncio.subprocess.Process | None = None
        self._expected = 0
        self._pids: dict[str, int] = {}
        self._codes: dict[str, int] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._forked = asyncio.Event()  # every requested node has a pid
        self._gone = asyncio.Event()  # the zygote's output ended (it exited)
        self._reader: asyncio.Task | None = None

    async def start(self, ids: list[str], cluster: str) -> list[WatchedNode]:
        self._zygote = zygote = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gossipfl.testbed.zygote",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert zygote.stdin is not None and zygote.stdout is not None
        self._reader = asyncio.get_running_loop().create_task(self._read(zygote.stdout))
        self._expected = len(ids)
        plan = self._plan(ids)
        for i, node_id, port, log_path in plan:
            request = {
                "id": node_id,
                "argv": ["node", *node_args(self.opts, i, node_id, port, cluster)],
                "log": str(log_path),
            }
            zygote.stdin.write(json.dumps(request).encode() + b"\n")
            self._ended[node_id] = asyncio.Event()
        await zygote.stdin.drain()
        zygote.stdin.close()
        await self._wait_forked(self.FORK_TIMEOUT_S)
        if not self._forked.is_set():
            raise RuntimeError(
                f"the testbed's zygote forked {len(self._pids)} of {len(ids)} nodes "
                + ("and exited" if self._gone.is_set() else f"in {self.FORK_TIMEOUT_S:.0f} s")
            )
        return self._watched(plan)

    async def _wait_forked(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self._forked, self._gone)]
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    def _record(self, msg: dict[str, Any]) -> None:
        if "pid" in msg:
            self._pids[msg["id"]] = msg["pid"]
            if len(self._pids) == self._expected:
                self._forked.set()
        elif "exit" in msg:
            self._codes[msg["id"]] = msg["exit"]
            self._ended[msg["id"]].set()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                self._record(json.loads(line))
        finally:
            self._gone.set()

    def check(self) -> None:
        for node_id, code in self._codes.items():
            raise RuntimeError(f"{node_id} exited with code {code} during start-up; see {self.out / node_id}.log")
        if self._gone.is_set():
            raise RuntimeError("the testbed's zygote exited while its nodes were starting")

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the pid now belongs to someone else's process: ours is gone
            return False
        return True

    async def _ended_or_gone(self, node_id: str, timeout: float) -> bool:
        """Wait until the zygote reports the node's exit or, once the zygote is gone (then nobody can
        report it), until the process no longer exists. False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._ended[node_id].is_set():
                return True
            if self._gone.is_set() and not self._alive(self._pids[node_id]):
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended[node_id].wait(), 0.1)
        return self._ended[node_id].is_set()

    async def stop(self) -> dict[str, int | None]:
        if self._zygote is None:
            return {}
        if self._zygote.stdin is not None and not self._zygote.stdin.is_closing():
            self._zygote.stdin.close()  # a start that was interrupted: let the zygote fork what it was sent
        if not self._forked.is_set() and not self._gone.is_set():
            await self._wait_forked(10.0)
        for node_id, pid in self._pids.items():
            if node_id not in self._codes and (not self._gone.is_set() or self._alive(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

        async def wait(node_id: str) -> int | None:
            if not await self._ended_or_gone(node_id, STOP_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pids[node_id], signal.SIGKILL)
                await self._ended_or_gone(node_id, 5.0)
                return None  # did not stop in time
            return self._codes.get(node_id)  # None: stopped, but with the zygote gone its code is unknown

        codes = await asyncio.gather(*(wait(node_id) for node_id in self._pids))
        try:
            await asyncio.wait_for(self._zygote.wait(), 10.0)  # it reaped every node: their CPU is ours now
        except TimeoutError:
            self._zygote.kill()
            await self._zygote.wait()
        if self._reader is not None:
            await self._reader
        return dict(zip(self._pids, codes, strict=True))

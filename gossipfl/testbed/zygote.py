"""A zygote for the process testbed: import what every node needs once (torch above all), then fork one
child per node, each running ``python -m gossipfl node ...`` exactly as a fresh interpreter would
(``runpy``). On a small machine, eight fresh interpreters importing torch at once are most of a
testbed's start-up; forked children share the imported modules instead. Each node is still a process
of its own, stopped with SIGTERM.

Protocol, one JSON object per line. On stdin, one request per node: ``{"id", "argv", "log"}`` (the
arguments after ``python -m gossipfl``, the log file); then EOF. On stdout: ``{"id", "pid"}`` once a
child is forked, ``{"id", "exit"}`` when it ends (its exit code; minus the signal number if a signal
ended it). The zygote exits once stdin is closed and every child has ended, so its children's CPU time
and memory reach the testbed's ``RUSAGE_CHILDREN`` with its own.

Run as ``python -m gossipfl.testbed.zygote [MODULE ...]``: the modules to import before forking."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import traceback

PRELOAD = ("torch", "gossipfl.node", "gossipfl.cli")


def _child(argv: list[str], log: str) -> int:
    """In the forked child: stdin from /dev/null, stdout and stderr to the log, default signal handling,
    then what ``python -m gossipfl ARGV`` does."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process ends with them)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = ["gossipfl", *argv]
    try:
        runpy.run_module("gossipfl", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def _report(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(preload: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the nodes; the zygote outlives them
    for name in preload:
        importlib.import_module(name)
    children: dict[int, str] = {}
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request["argv"], request["log"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = request["id"]
        _report(id=request["id"], pid=pid)
    while children:
        pid, status = os.wait()
        if pid in children:
            _report(id=children.pop(pid), exit=os.waitstatus_to_exitcode(status))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(PRELOAD)))

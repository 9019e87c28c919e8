"""One push-pull exchange between two gossipfl node processes over loopback, for models of 1 to 400 MB,
against what the machine allows and the usual baselines, all in the same run on the same bytes
(issue 18). Every measurement is between separate OS processes on 127.0.0.1 (ports PORT_BASE..+39):

- raw TCP (the limit): a client process sends the model's bytes from a preallocated buffer with
  ``sendall``; the server process reads them with ``recv_into`` into a preallocated buffer and answers a
  1-byte ack (one way) or the same number of bytes (round trip). MB/s one way = N / t; both ways = 2N / t.
- serving: one node (``--task synthetic:mb=N --no-train``); a client process times ``GET
  /v1/model?format=msgpack`` and ``?format=safetensors`` read fully into a preallocated buffer.
- exchange: nodes A and B, static seeds to each other; B only answers (``--gossip-interval 1e6``: the
  config has no upper bound, and its first exchange would be one interval after start), A initiates
  (``--gossip-interval 0.2``; the node paces itself to ~4x the last exchange's duration). p50/p99/mean
  are A's ``/v1/status`` ``exchanges.*_duration_s`` (the last 100 committed exchanges, nearest rank; they
  include the first exchange); throughput = 2 x model bytes / p50.
- pickle / torch.save over HTTP: an aiohttp server process holding a state dict of the synthetic model's
  shapes; the client process POSTs its pickled (protocol 5) / torch.saved state, the server unpickles
  (``torch.load(weights_only=True)``), replies with its own state and averages; the client unpickles and
  averages. Timed per exchange on the client.

Warm-ups: raw TCP, serving and the baselines time ``--repeats`` rounds after one untimed warm-up.

Peak RSS above idle (every server/node process): VmRSS from /proc/PID/status once the process is up and
its RSS is steady, then ``5 > /proc/PID/clear_refs`` (resets VmHWM to the current RSS), then VmHWM after
the measurement; reported as MB and as a multiple of the model's size. For the exchange the start-up
peak of both nodes is kept out by this order: start B (seed: A, not running yet), wait until it answers,
read its idle RSS, reset its peak, SIGSTOP it; start A (seed: B): A's probe of B's /v1/status waits on
the stopped B, so A knows no peer and cannot start an exchange; wait until A answers, read its idle RSS,
reset its peak; SIGCONT B. B answers A's probe and A's exchanges begin (within one interval, or one
seed retry, 5 s, if the probe timed out). Run until A's ``exchanges.ok >= repeats``.

    .venv/bin/python benchmarks/exchange.py [--sizes 1 10 100 400] [--repeats R] [--out PREFIX]
        [--pythonpath OTHER_CHECKOUT] [--node-args "..."] [--port-base 19000] [--baseline PREFIX.json] [--plot]

``--pythonpath`` runs the nodes (only) from another checkout, e.g. a worktree of the code before a
change. ``--node-args`` adds options to every node: a node evaluates its model every ``--eval-interval``
(1 s) on the test split, under the learner's lock, which at 100-400 MB costs seconds of CPU per second and
slows the exchanges; ``--node-args '--eval-interval 3600'`` measures the exchange alone.
Writes PREFIX.json (raw numbers, machine, commits, load averages), PREFIX.md, PREFIX.png.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import exchange_report as report  # noqa: E402
from exchange_workers import cpu_s, mem, reset_peak, settle  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "exchange_workers.py"
PY = sys.executable
MiB = 1 << 20


def default_repeats(mb: float) -> int:
    return 20 if mb <= 10 else 10 if mb <= 100 else 5


def model_shapes(mb: float) -> dict[str, list[int]]:
    """The parameter shapes of ``synthetic:mb=N`` (built on the meta device: no memory)."""
    import torch

    from gossipfl.learning.tasks.synthetic import SyntheticTask

    with torch.device("meta"):
        model = SyntheticTask(mb=mb).build_model()
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Procs:
    """The processes this run started: each is stopped (TERM, then KILL) by its pid at the end."""

    def __init__(self, logdir: Path, pythonpath: str | None, node_args: list[str] | None = None) -> None:
        self.logdir, self.pythonpath, self.node_args, self.live = logdir, pythonpath, node_args or [], []

    def spawn(self, cmd: list[str], name: str, node: bool = False) -> subprocess.Popen:
        env = dict(os.environ)
        if node and self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        cmd = cmd + self.node_args if node else cmd
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115
        # a node runs from the log folder: python -m puts the cwd ahead of PYTHONPATH
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.logdir)
        log.close()
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on TERM
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            self.stop(p)


def worker(role: str, timeout: float, **kw: object) -> dict:
    r = subprocess.run([PY, str(WORKERS), role, json.dumps(kw)], capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{role} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def get_json(port: int, path: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(port: int, path: str, p: subprocess.Popen, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode} before answering (see its log)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer {path} within {timeout:.0f} s")
        time.sleep(0.05)


def node_cmd(mb: float, port: int, seeds: list[int], interval: float, seed: int) -> list[str]:
    cmd = [
        PY,
        "-m",
        "gossipfl",
        "node",
        "--task",
        f"synthetic:mb={mb:g}",
        "--no-train",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--discovery",
        "static",
        "--join-wait",
        "0",
        "--gossip-interval",
        f"{interval:g}",
        "--seed",
        str(seed),
        "--id",
        f"bench-{port}",
        "--log-level",
        "info",
    ]
    return cmd + (["--seeds", ",".join(f"127.0.0.1:{s}" for s in seeds)] if seeds else [])


def peak(pid: int, idle: int, nbytes: int) -> dict:
    hwm = mem(pid)["VmHWM"]
    return {
        "idle_rss_mb": idle / MiB,
        "peak_rss_mb": hwm / MiB,
        "above_idle_mb": (hwm - idle) / MiB,
        "multiple": (hwm - idle) / nbytes,
    }


def start_idle(procs: Procs, cmd: list[str], name: str, port: int, path: str, mb: float, node: bool) -> tuple:
    p = procs.spawn(cmd, name, node=node)
    wait_up(port, path, p, 60 + mb, name)
    idle = settle(p.pid)
    reset_peak(p.pid)
    return p, idle


def measure_raw(nbytes: int, repeats: int, port: int, procs: Procs) -> dict:
    server = procs.spawn([PY, str(WORKERS), "tcp-server", json.dumps({"port": port, "nbytes": nbytes})], "tcp")
    try:
        r = worker("tcp-client", 60 + nbytes / MiB * repeats, port=port, nbytes=nbytes, repeats=repeats)
    finally:
        procs.stop(server)
    return r


def measure_serving(mb: float, nbytes: int, repeats: int, port: int, procs: Procs) -> dict:
    node, idle = start_idle(procs, node_cmd(mb, port, [], 1e6, 1), f"serve-{mb:g}", port, "/v1/status", mb, True)
    out = {}
    try:
        for fmt in ("msgpack", "safetensors"):
            cpu0 = cpu_s(node.pid)
            r = worker(
                "http-get", 60 + mb * repeats, port=port, path=f"/v1/model?format={fmt}", nbytes=nbytes, repeats=repeats
            )
            out[fmt] = {**r, "memory": peak(node.pid, idle, nbytes), "cpu_s": (cpu_s(node.pid) - cpu0) / (repeats + 1)}
            idle = settle(node.pid)
            reset_peak(node.pid)
    finally:
        procs.stop(node)
    return out


def measure_exchange(mb: float, nbytes: int, repeats: int, ports: tuple[int, int], procs: Procs) -> dict:
    pa, pb = ports
    b, idle_b = start_idle(procs, node_cmd(mb, pb, [pa], 1e6, 2), f"B-{mb:g}", pb, "/v1/status", mb, True)
    try:
        os.kill(b.pid, signal.SIGSTOP)
        a, idle_a = start_idle(procs, node_cmd(mb, pa, [pb], 0.2, 1), f"A-{mb:g}", pa, "/v1/status", mb, True)
        try:
            os.kill(b.pid, signal.SIGCONT)
            t0, cpu_a, cpu_b = time.monotonic(), cpu_s(a.pid), cpu_s(b.pid)
            deadline = t0 + 120 + repeats * mb * 0.5
            while (st := get_json(pa, "/v1/status", 30)["exchanges"])["ok"] < repeats:
                if (
                    time.monotonic() > deadline
                    or st["failed"] > 3 * repeats + 5
                    or a.poll() is not None
                    or b.poll() is not None
                ):
                    raise RuntimeError(f"exchange {mb:g} MB: {st['ok']} of {repeats} exchanges ok: {st}")
                time.sleep(0.25)
            wall = time.monotonic() - t0
            st_b = get_json(pb, "/v1/status", 30)["exchanges"]
            mem_a, mem_b = peak(a.pid, idle_a, nbytes), peak(b.pid, idle_b, nbytes)
            cpu_a, cpu_b = cpu_s(a.pid) - cpu_a, cpu_s(b.pid) - cpu_b
        finally:
            procs.stop(a)
    finally:
        procs.stop(b)
    moved = max(1, st["ok"] + st["aborted"])  # exchanges whose two models crossed the link
    return {
        "a": st,
        "b": st_b,
        "wall_s": wall,
        "bytes_sent_per_exchange": st["bytes_sent"] / moved,
        "bytes_received_per_exchange": st["bytes_received"] / moved,
        "memory_a": mem_a,
        "memory_b": mem_b,
        # CPU seconds per exchange of each node (all threads; A's also polls its status every 0.25 s)
        "cpu_a_s": cpu_a / moved,
        "cpu_b_s": cpu_b / moved,
    }


def measure_baseline(fmt: str, mb: float, nbytes: int, repeats: int, port: int, procs: Procs) -> dict:
    shapes = model_shapes(mb)
    args = json.dumps({"port": port, "fmt": fmt, "shapes": shapes, "nbytes": nbytes})
    cmd = [PY, str(WORKERS), "ser-server", args]
    server, idle = start_idle(procs, cmd, f"{fmt}-{mb:g}", port, "/ready", mb, False)
    try:
        cpu0 = cpu_s(server.pid)
        r = worker("ser-client", 120 + mb * repeats, port=port, fmt=fmt, shapes=shapes, repeats=repeats)
        r["memory"] = peak(server.pid, idle, nbytes)
        r["server_cpu_s"] = (cpu_s(server.pid) - cpu0) / (repeats + 1)  # the warm-up exchange too
        r["client_memory"] = {
            "above_idle_mb": (r["client_peak_rss"] - r["client_idle_rss"]) / MiB,
            "multiple": (r["client_peak_rss"] - r["client_idle_rss"]) / nbytes,
        }
    finally:
        procs.stop(server)
    return r


def git_info(path: Path) -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True).stdout.strip()

    return {
        "path": str(path),
        "commit": git("rev-parse", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "gossipfl_dirty": bool(git("status", "--porcelain", "--", "gossipfl")),
        # uncommitted changes measured: their digest, and the files (git diff HEAD -- gossipfl)
        "gossipfl_diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", "gossipfl").encode()).hexdigest(),
        "gossipfl_diff_files": git("diff", "HEAD", "--name-only", "--", "gossipfl").split(),
    }


def machine(args: argparse.Namespace) -> dict:
    import platform

    import aiohttp
    import numpy
    import torch

    nodes_from = Path(args.pythonpath) if args.pythonpath else HERE.parent
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "aiohttp": aiohttp.__version__,
        "numpy": numpy.__version__,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "bench_checkout": git_info(HERE.parent),
        "nodes_checkout": git_info(nodes_from),
    }


def run(args: argparse.Namespace) -> dict:
    base = args.port_base
    res = {"machine": machine(args), "argv": sys.argv[1:], "node_args": args.node_args, "loadavg_start": loadavg()}
    res["sizes"] = []
    print(f"load average at start: {res['loadavg_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        procs = Procs(Path(tmp), args.pythonpath, shlex.split(args.node_args))
        try:
            for mb in args.sizes:
                shapes = model_shapes(mb)
                nbytes = 4 * sum(math.prod(s) for s in shapes.values())
                reps = args.repeats or default_repeats(mb)
                row: dict = {"mb": mb, "model_bytes": nbytes, "repeats": reps, "tensors": len(shapes)}
                p = functools.partial
                steps = [
                    ("raw_tcp", p(measure_raw, nbytes, reps, base, procs)),
                    ("serving", p(measure_serving, mb, nbytes, reps, base + 10, procs)),
                    ("exchange", p(measure_exchange, mb, nbytes, reps, (base + 20, base + 21), procs)),
                    ("pickle_http", p(measure_baseline, "pickle", mb, nbytes, reps, base + 30, procs)),
                    ("torch_http", p(measure_baseline, "torch", mb, nbytes, reps, base + 31, procs)),
                ]
                for name, step in steps:
                    la, t0 = loadavg(), time.monotonic()
                    try:
                        row[name] = step()
                    except Exception as e:  # noqa: BLE001 - recorded, the rest of the run goes on
                        row[name] = {"error": f"{type(e).__name__}: {e}"}
                        print(f"  {mb:g} MB {name}: FAILED: {e}", flush=True)
                        logs = sorted(Path(tmp).glob("*.log"))
                        for log in logs[-3:]:
                            print(f"--- {log.name}\n{log.read_text()[-1500:]}", flush=True)
                    row[name + "_meta"] = {
                        "loadavg_before": la,
                        "loadavg_after": loadavg(),
                        "seconds": round(time.monotonic() - t0, 1),
                    }
                    print(f"  {mb:g} MB {name}: {row[name + '_meta']['seconds']} s", flush=True)
                res["sizes"].append(row)
        finally:
            procs.stop_all()
    res["loadavg_end"] = loadavg()
    print(f"load average at end: {res['loadavg_end']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100, 400], help="model sizes, MB (2^20 B)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 20 up to 10 MB, 10 up to 100, else 5")
    ap.add_argument("--out", default=str(HERE / "results" / "exchange"), help="output prefix")
    ap.add_argument("--pythonpath", default=None, help="run the nodes from this checkout of gossipfl")
    ap.add_argument("--node-args", default="", help="more options for every node, e.g. '--eval-interval 3600'")
    ap.add_argument("--port-base", type=int, default=19000, help="ports used: PORT_BASE .. PORT_BASE+31")
    ap.add_argument("--baseline", default=None, help="an earlier run's json: adds a before/after table")
    ap.add_argument("--plot", action="store_true", help="redraw PREFIX.md and PREFIX.png from PREFIX.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot:
        res = json.loads(out.with_suffix(".json").read_text())
    else:
        res = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    before = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    print(report.table(res))
    out.with_suffix(".md").write_text(report.markdown(res, before, out.with_suffix(".png").name))
    report.plot(res, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()

"""Hosts as Linux network namespaces on a bridge, for chaos tests: one node process per host, real mDNS
multicast between them, and faults injected from outside the nodes (lossy or slow links, a partition,
SIGKILL and restart). Needs root and iproute2 (``ip``, ``tc``), and nftables (``nft``) for lossy links
on a kernel without tc netem; nothing is installed.

Layout (every name starts with the network's prefix, e.g. ``gfl-3f9a-``; nothing is ever added to the
controller's own namespace, and names resolve from /etc/hosts only inside the hosts): a bridge namespace
``PREFIXbr`` holding the bridges (``br0``; ``br1``... during a partition) and one veth end ``hI`` per host;
host namespaces ``PREFIXhI`` with ``lo`` and ``eth0`` (the other end of ``hI``), address SUBNET.(10+I)/24,
IPv6 off; the node binds that address and runs mDNS on it.

Faults: ``impair`` acts on the link between host I and the bridge, each way: ``tc netem`` delay and loss;
on kernels without netem (CONFIG_NET_SCH_NETEM, as where this was written) loss from an nftables rule on
the bridge (``numgen random``: a silent per-packet drop, as on a wire), or, with ``reset``, TCP segments
answered with a reset in the host; delay needs netem. ``partition`` moves the bridge ends of each group's
hosts onto a bridge of their own (nothing crosses, multicast included); ``heal`` moves them back.
``kill`` sends SIGKILL; ``restart`` starts the node again with the same command line.

Monitoring: the controller reads node I's HTTP API from inside host I's namespace (a pool thread enters
it with setns(2), then connects to the node's local address): nothing is added to the controller's
namespace, and a partition or a lossy link under test never touches the reads, nor do they load it.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX = "gfl-"
NODE_PORT = 8470  # every node listens on its own host's address, so all can use the same port
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    """A command that builds or changes the network failed; the message says which and why."""


def missing_requirements() -> str | None:
    """Why this machine cannot run the testbed (not root, no ``ip`` or ``tc``), or None when it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (iproute2)"
    return None


def run(cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (split on spaces: no argument here has one); NetnsError unless it succeeds or not ``check``."""
    r = subprocess.run(cmd.split(), input=stdin, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"{cmd}: {r.stderr.strip() or f'exit code {r.returncode}'}")
    return r


def namespaces(prefix: str) -> list[str]:
    """The network namespaces whose name starts with ``prefix``."""
    names = [line.split()[0] for line in run("ip netns list").stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def remove(prefix: str, only: Sequence[str] | None = None) -> list[str]:
    """Kill the processes in every namespace whose name starts with ``prefix`` (and is in ``only``, when
    given) and delete those namespaces (their veth ends go with them); returns the names removed. Also
    for what a run killed before it could clean up left behind: ``remove("gfl-")``."""
    gone = [n for n in namespaces(prefix) if only is None or n in only]
    for name in gone:
        for pid in run(f"ip netns pids {name}", check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(f"ip netns del {name}", check=False)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    return gone


ETC_NETNS = Path("/etc/netns")  # files here are bind-mounted over /etc by ``ip netns exec NAME``


def _isolate_names(ns: str) -> None:
    """Host names resolve from /etc/hosts only inside ``ns``: no NSS module may hand a lookup to a daemon
    of the machine's own namespace (systemd-resolved, avahi, nscd) that would ask its real network."""
    d = ETC_NETNS / ns
    d.mkdir(parents=True, exist_ok=True)
    (d / "nsswitch.conf").write_text("hosts: files\nnetworks: files\n")
    (d / "resolv.conf").write_text("# chaos testbed: no name server\n")


def _die_with_parent() -> None:
    """In a node's process before exec: SIGKILL it if the controller dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _setns(fd: int) -> None:
    """Move the calling thread (only it) into the network namespace open as ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Host:
    index: int
    ns: str
    addr: str
    node_id: str
    argv: list[str] = field(default_factory=list)  # the node's command line, kept for restart
    proc: subprocess.Popen | None = None
    starts: int = 0
    killed: bool = False  # by ``kill``, and not restarted since

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{NODE_PORT}"


class Network:
    """N hosts on a bridge, each in its own network namespace; a context manager that removes everything
    it made on exit, including after Ctrl-C or an error half-way through building."""

    def __init__(self, hosts: int, logs: Path, *, subnet: str = "10.77.0", prefix: str | None = None) -> None:
        if not 1 <= hosts <= 240:
            raise ValueError("hosts must be 1..240")
        self.prefix = prefix or f"{PREFIX}{secrets.token_hex(3)}-"
        self.bridge_ns = self.prefix + "br"
        self.logs = logs
        self.hosts = [Host(i, f"{self.prefix}h{i}", f"{subnet}.{10 + i}", f"n{i}") for i in range(hosts)]
        self.netem = False  # whether the kernel has tc netem (decided when the network is built)
        self._bridges = 1
        self._made: list[str] = []  # the namespaces this network added: the only ones it deletes
        self._fds: list[int] = []
        self._pool: ThreadPoolExecutor | None = None

    # -- building and removing -------------------------------------------------------------------
    def __enter__(self) -> Network:
        # SIGTERM (a cancelled CI job, kill) unwinds like Ctrl-C, through destroy(); nodes also get SIGKILL
        # if this process dies without unwinding (see _die_with_parent)
        self._old_term = None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if taken := namespaces(self.prefix):
            raise NetnsError(f"namespaces named {self.prefix}* exist already: {taken}")
        for ns in [self.bridge_ns, *(h.ns for h in self.hosts)]:
            run(f"ip netns add {ns}")
            self._made.append(ns)  # (after the add: a name that was taken is never this network's to delete)
            _isolate_names(ns)
            v6 = "net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
            run(f"ip netns exec {ns} sysctl -qw {v6}")  # no IPv6: no link-local chatter, mDNS on IPv4 only
            run(f"ip -n {ns} link set lo up")
        self._add_bridge("br0")
        br = self.bridge_ns
        for h in self.hosts:
            run(f"ip -n {br} link add h{h.index} type veth peer name eth0 netns {h.ns}")  # made in place
            run(f"ip -n {br} link set h{h.index} master br0 up")
            run(f"ip -n {h.ns} addr add {h.addr}/24 dev eth0")
            run(f"ip -n {h.ns} link set eth0 up")
        self.netem = run(f"tc -n {br} qdisc add dev lo root netem delay 0ms", check=False).returncode == 0
        run(f"tc -n {br} qdisc del dev lo root", check=False)
        self._fds = [os.open(NETNS_DIR / h.ns, os.O_RDONLY) for h in self.hosts]
        self._pool = ThreadPoolExecutor(max_workers=min(16, len(self.hosts)), thread_name_prefix="netns-read")

    def _add_bridge(self, name: str) -> None:
        # no IGMP snooping: mDNS (224.0.0.251) goes to every port of the bridge, as on a plain switch
        run(f"ip -n {self.bridge_ns} link add {name} type bridge mcast_snooping 0")
        run(f"ip -n {self.bridge_ns} link set {name} up")

    def destroy(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s), then delete the namespaces."""
        try:
            self.stop_all()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            remove(self.prefix, only=self._made)
            self._made = []

    # -- nodes -----------------------------------------------------------------------------------
    def start(self, i: int, args: Sequence[str], python: str = sys.executable) -> None:
        """Start a node in host ``i``: ``gossipfl node`` on its address with mDNS on it, plus ``args``."""
        h = self.hosts[i]
        own = f"--host {h.addr} --port {NODE_PORT} --id {h.node_id} --mdns-interface {h.addr}"
        h.argv = [python, "-m", "gossipfl", "node", *own.split(), *args]
        self._spawn(h)

    def _spawn(self, h: Host) -> None:
        log: IO[bytes]
        with open(self.logs / f"{h.node_id}.log", "ab") as log:
            log.write(f"--- start {h.starts + 1}: {' '.join(h.argv)}\n".encode())
            log.flush()
            # ip netns exec execs the command: the pid is the node's; a session of its own keeps a
            # Ctrl-C in the controller's terminal from reaching the nodes before the controller stops them
            h.proc = subprocess.Popen(
                ["ip", "netns", "exec", h.ns, *h.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        h.starts += 1
        h.killed = False

    def kill(self, i: int) -> None:
        """SIGKILL the node of host ``i`` (no goodbye on mDNS, connections left half-open)."""
        p = self.hosts[i].proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
            self.hosts[i].killed = True

    def restart(self, i: int) -> None:
        """Start host ``i``'s node again with the command line it had (it must not be running)."""
        h = self.hosts[i]
        if h.proc is not None and h.proc.poll() is None:
            raise NetnsError(f"{h.node_id} is still running")
        if not h.argv:
            raise NetnsError(f"{h.node_id} was never started")
        self._spawn(h)

    def running(self, i: int) -> bool:
        p = self.hosts[i].proc
        return p is not None and p.poll() is None

    def stop_all(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every running node; node id -> exit code (None: killed after ``timeout`` s)."""
        procs = {h.node_id: h.proc for h in self.hosts if h.proc is not None}
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for node_id, p in procs.items():
            try:
                codes[node_id] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[node_id] = None
        return codes

    # -- faults ----------------------------------------------------------------------------------
    def impair(
        self, i: int, *, delay_ms: float = 0.0, jitter_ms: float = 0.0, loss: float = 0.0, reset: bool = False
    ) -> None:
        """Impair the link of host ``i`` each way: every packet to or from it is delayed by ``delay_ms``
        (+- ``jitter_ms``) and lost with probability ``loss`` (or, with ``reset``, a TCP segment is answered
        with a reset: its connection cut at once instead of the segment retransmitted). Replaces an earlier
        impairment of that link. Two impaired hosts talk over two impaired links."""
        h, br = self.hosts[i], self.bridge_ns
        if not 0.0 <= loss <= 1.0:
            raise ValueError("loss must be in [0, 1]")
        if (delay_ms or jitter_ms) and (reset or not self.netem):
            raise NetnsError("link delay needs tc netem (this kernel lacks it: CONFIG_NET_SCH_NETEM), without reset")
        self.clear(i)
        if self.netem and not reset and (delay_ms or jitter_ms or loss):
            spec = f"netem delay {delay_ms:g}ms {jitter_ms:g}ms loss {100 * loss:g}%"
            run(f"tc -n {h.ns} qdisc replace dev eth0 root {spec}")  # leaving the host
            run(f"tc -n {br} qdisc replace dev h{i} root {spec}")  # coming to it
        elif loss > 0.0:  # no netem: the same random per-packet verdict from nftables
            if shutil.which("nft") is None:
                raise NetnsError("link loss needs tc netem or nft (nftables); this machine has neither")
            draw = f"numgen random mod 1000000 < {round(loss * 1_000_000)}"
            if reset:  # in the host: its TCP segments answered with a reset, each way
                rules = f"""table ip gfl_chaos {{
  chain out {{ type filter hook output priority 0; policy accept; oifname "eth0" meta l4proto tcp {draw} reject with tcp reset; }}
  chain in {{ type filter hook input priority 0; policy accept; iifname "eth0" meta l4proto tcp {draw} reject with tcp reset; }}
}}"""  # noqa: E501
                run(f"ip netns exec {h.ns} nft -f -", stdin=rules)
            else:  # on the bridge, as on a wire: no sender hears of it (a drop in the host's output would be EPERM)
                rules = f"""table bridge gfl_chaos_h{i} {{
  chain lossy {{ type filter hook forward priority 0; policy accept; iifname "h{i}" {draw} drop; oifname "h{i}" {draw} drop; }}
}}"""  # noqa: E501
                run(f"ip netns exec {br} nft -f -", stdin=rules)

    def clear(self, i: int) -> None:
        """Remove any impairment of host ``i``'s link."""
        ns = self.hosts[i].ns
        run(f"tc -n {ns} qdisc del dev eth0 root", check=False)
        run(f"tc -n {self.bridge_ns} qdisc del dev h{i} root", check=False)
        if shutil.which("nft"):
            run(f"ip netns exec {ns} nft delete table ip gfl_chaos", check=False)
            run(f"ip netns exec {self.bridge_ns} nft delete table bridge gfl_chaos_h{i}", check=False)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Split the network: the hosts of ``groups[k]`` go onto bridge k (the rest onto ``br0``);
        nothing, multicast included, crosses between bridges."""
        while self._bridges < len(groups):
            self._add_bridge(f"br{self._bridges}")
            self._bridges += 1
        where = {i: k for k, group in enumerate(groups) for i in group}
        for h in self.hosts:
            run(f"ip -n {self.bridge_ns} link set h{h.index} master br{where.get(h.index, 0)}")

    def heal(self) -> None:
        """Every host back on ``br0``."""
        self.partition([])

    def bridge_of(self, i: int) -> str:
        """The bridge host ``i`` is on (``br0`` unless partitioned away)."""
        out = run(f"ip -n {self.bridge_ns} -j link show h{i}").stdout
        return str(json.loads(out)[0].get("master", ""))

    # -- reading the nodes -----------------------------------------------------------------------
    def _get(self, i: int, path: str, timeout: float) -> bytes | None:
        _setns(self._fds[i])  # this pool thread, then its socket, in host i's namespace
        h = self.hosts[i]
        conn = http.client.HTTPConnection(h.addr, NODE_PORT, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            return body if r.status == 200 else None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def get_many(self, path: str, hosts: Sequence[int] | None = None, timeout: float = 2.0) -> list[bytes | None]:
        """GET ``path`` from the nodes of ``hosts`` (default: all) at once; None where a node did not answer 200."""
        if self._pool is None:
            raise NetnsError("the network is not built")
        chosen = range(len(self.hosts)) if hosts is None else hosts
        return list(self._pool.map(lambda i: self._get(i, path, timeout), chosen))

    def statuses(self, hosts: Sequence[int] | None = None, timeout: float = 2.0) -> list[dict[str, Any] | None]:
        """Every node's ``/v1/status`` (None: no answer)."""
        return [None if b is None else json.loads(b) for b in self.get_many("/v1/status", hosts, timeout)]

    def models(self, hosts: Sequence[int] | None = None, timeout: float = 5.0) -> list[bytes | None]:
        """Every node's ``/v1/model`` payload (None: no answer)."""
        return self.get_many("/v1/model", hosts, timeout)

    def wait_ready(self, peers: int | None = None, timeout: float = 120.0, hosts: Sequence[int] | None = None) -> None:
        """Wait until the nodes of ``hosts`` answer and each knows at least ``peers`` others (default:
        all the other hosts); raises NetnsError naming the laggards, or a node that exited."""
        chosen = list(range(len(self.hosts)) if hosts is None else hosts)
        want = len(self.hosts) - 1 if peers is None else peers
        deadline = time.monotonic() + timeout
        while True:
            for i in chosen:
                p = self.hosts[i].proc
                if p is not None and p.poll() is not None:
                    raise NetnsError(f"{self.hosts[i].node_id} exited with code {p.returncode}; see {self.logs}")
            sts = self.statuses(chosen)
            late = [
                self.hosts[i].node_id
                for i, st in zip(chosen, sts, strict=True)
                if st is None or len(st.get("peers", [])) < want
            ]
            if not late:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"not ready after {timeout:.0f} s (each needs {want} peers): {late}")
            time.sleep(0.3)

"""A gossipfl node: HTTP server + discovery + local learner + gossip loop, with a start/stop lifecycle.

Several nodes may share one process and one event loop (pass a shared AsyncZeroconf).
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from zeroconf import NonUniqueNameException
from zeroconf.asyncio import AsyncZeroconf

from . import modelfile, replica, serving, wire
from .api import build_app
from .config import NodeConfig
from .discovery import (
    Identity,
    MdnsDiscovery,
    SeedDiscovery,
    advertised_addresses,
    make_zeroconf,
    mdns_interfaces,
)
from .dns import DnsDiscovery, DnsError
from .gossip import Gossiper
from .httpserver import NodeRunner
from .learning.learner import Learner, build_seeded, resolve_device
from .learning.partition import class_histogram, partition
from .learning.registry import build_checked, get_task, load_checked
from .learning.task import Dataset, Evaluation, Task
from .logs import node_logger
from .metrics import NodeMetrics, Readings
from .peers import PeerTable
from .pex import PeerExchange
from .probing import Prober
from .supervise import Supervisor

STOP_GRACE_S = 3.0  # on stop, loops and exchanges in flight get this long, then are cancelled
SEED_RETRY_S = 5.0
INFERENCE_CONCURRENCY = 2  # inference requests running at once; others wait their turn
INFERENCE_UPLOADS = 8  # inference bodies being received at once; more are answered 503
MAX_INBOUND_PROBES = 16  # unknown callers being identified at once; more wait for their next call


class StartError(Exception):
    """The node cannot start as configured (port taken, mDNS interface missing, id in use)."""


PUBLISH_AFTER_INTERVALS = 3


def build_learner(task: Task, train: Dataset, test: Dataset, cfg: NodeConfig, *, weight: float = 1.0) -> Learner:
    """The Learner a node with this configuration trains: model initialised from ``init_seed(cfg)``,
    minibatch order from ``cfg.seed``, optimizer and schedule from ``cfg`` (benchmarks use it too, for
    reference models trained the same way)."""
    model = build_seeded(lambda: build_checked(task), init_seed(cfg))
    return Learner(
        task,
        model,
        train,
        test,
        seed=cfg.seed,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        lr_decay_steps=cfg.lr_decay_steps,
        batch_size=cfg.batch_size,
        weight=weight,
        device=resolve_device(cfg.device),
        publish_after_steps=publish_after_steps(cfg),
    )


def init_seed(cfg: NodeConfig) -> int:
    """The seed of a node's initial model. By default every node of a training cluster starts from the
    same parameters (seeded by the cluster-wide ``--data-seed``), as a federated server's first broadcast
    would make them: averaging independently initialised networks mixes unrelated hidden units (they are
    only defined up to a permutation) and shrinks the weights. Pure averaging (``--no-train``) starts
    each node from its own ``--seed`` instead, so that there is something to average."""
    if cfg.init_seed is not None:
        return cfg.init_seed
    return cfg.seed if cfg.no_train else cfg.data_seed


def publish_after_steps(cfg: NodeConfig) -> int:
    """Local steps after which a node that has not merged serves its working copy: three gossip
    intervals' worth of training (0 with --no-train, where there are no local steps)."""
    if cfg.no_train:
        return 0
    return round(PUBLISH_AFTER_INTERVALS * cfg.gossip_interval * cfg.steps_per_round / cfg.train_interval)


def default_node_id(port: int) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "node"
    return f"{host[:50]}-{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Node:
    def __init__(self, config: NodeConfig, *, zeroconf: AsyncZeroconf | None = None, task: Task | None = None):
        self.config = config
        self.task = task or get_task(config.task, config.data)
        self._shared_zc = zeroconf
        self._own_zc: AsyncZeroconf | None = None
        self._stopping = asyncio.Event()
        self.failed = asyncio.Event()  # set when a background loop cannot go on (see supervise.py)
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._mdns: MdnsDiscovery | None = None
        self._started = False
        self.last_eval: Evaluation | None = None
        self.inference_slots = asyncio.Semaphore(INFERENCE_CONCURRENCY)
        self.inference_uploads = asyncio.Semaphore(INFERENCE_UPLOADS)
        self._probing: set[str] = set()  # addresses of inbound peers being identified
        self.partition = config.partition  # K/N, resolved at start when it is auto/N
        self.partition_source: str | None = None  # the name whose ordinal gave K (auto/N)
        self.train_loss: float | None = None
        self.started_at: float | None = None

    @property
    def exit_code(self) -> int:
        """What a process running this node should exit with: 1 after a fatal loop failure, else 0."""
        return 0 if self.failure is None else 1

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._start()
            self._started = True
        except BaseException:
            await self._close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        try:
            data = await asyncio.to_thread(load_checked, self.task, cfg.data_seed)
            k, n = await self._shard()
            self.shard = partition(data.train.y, n, cfg.partition_scheme, cfg.data_seed)[k]
            local = data.train.subset(self.shard)
            # push-sum weight = local sample count: the consensus becomes the data-weighted mean
            self.learner = build_learner(self.task, local, data.test, cfg, weight=len(local))
        except ValueError as e:  # TaskError, or a partition that cannot be made
            raise StartError(str(e)) from None
        self.class_histogram = class_histogram(data.train.y, self.shard, data.num_classes)
        self.signature = await asyncio.to_thread(serving.signature, self.task, self.learner, data.num_classes)
        initial = None if cfg.no_train else wire.state_digest(self.learner.snapshot().params)

        try:
            sock = bind_socket(cfg.host, cfg.port)
        except OSError as e:
            raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        self.id = cfg.id or default_node_id(self.port)
        self.log = node_logger(self.id)
        self.url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '') else cfg.host}:{self.port}"
        self.peers = PeerTable(self.id)
        self.supervisor = Supervisor(self.log, on_fatal=self._on_fatal)
        self.gossiper = Gossiper(
            node_id=self.id,
            task=self.task.name,
            learner=self.learner,
            peers=self.peers,
            interval=cfg.gossip_interval,
            rule=cfg.merge,
            cluster=cfg.cluster,
            rng=random.Random(f"{cfg.seed}/gossip/{self.id}"),
            log=self.log,
            port=self.port,
        )
        self.gossiper.on_error = lambda e: self.supervisor.error("gossip", e, in_a_round=False)
        split = f"{cfg.data_seed}/{n}/{cfg.partition_scheme}"
        self.identity = Identity(self.task.name, self.gossiper.model_digest, cfg.cluster, cfg.merge, split, initial)
        self.metrics = NodeMetrics(self._readings, node_id=self.id, task=self.task.name)
        self.gossiper.on_exchange = self.metrics.exchange

        self._runner = NodeRunner(build_app(self))
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, sock_connect=2))

        if "mdns" in cfg.discovery:
            await self._start_mdns()
        prober = Prober(identity=self.identity, peers=self.peers, session_factory=lambda: self._session, log=self.log)
        if cfg.seeds:
            self._loop("seeds", SEED_RETRY_S, SeedDiscovery(cfg.seeds, prober=prober, log=self.log).round)
        if cfg.dns_name:
            dns = DnsDiscovery(
                cfg.dns_name, self.port, prober=prober, peers=self.peers, log=self.log, interval=cfg.dns_interval
            )
            try:
                await dns.check()
            except DnsError as e:
                raise StartError(str(e)) from None
            self._loop("dns", cfg.dns_interval, dns.round)
        pex = PeerExchange(
            prober=prober,
            peers=self.peers,
            session_factory=lambda: self._session,
            rng=random.Random(f"{cfg.seed}/pex/{self.id}"),
            log=self.log,
        )
        self._loop("pex", cfg.pex_interval, pex.round)
        self.gossiper.on_inbound = lambda sender, url: self._learn_inbound(prober, url)

        self.started_at = time.monotonic()
        session = self._session
        self._loop("gossip", self.gossiper.next_delay, lambda: self.gossiper.round(session), first_wait=True)
        self._loop("eval", cfg.eval_interval, self._evaluate)
        if not cfg.no_train:
            self._loop("train", cfg.train_interval, self._train_round)
        self.log.info(
            "node up at %s: task=%s partition=%s samples=%d discovery=%s",
            self.url,
            self.task.name,
            self.partition,
            len(local),
            ",".join(cfg.discovery),
        )

    def _loop(self, name: str, interval: Any, work: Any, *, first_wait: bool = False) -> None:
        """A supervised background loop (see supervise.py)."""
        loop = self.supervisor.loop(name, interval, self._stopping, work, first_wait=first_wait)
        task = asyncio.get_running_loop().create_task(loop)
        self.supervisor.watch(task, name, self._stopping)
        self._tasks.append(task)

    def _on_fatal(self, reason: str) -> None:
        self.failure = reason
        self.failed.set()

    def _learn_inbound(self, prober: Prober, url: str) -> None:
        """A peer we did not know exchanged with us: check who it is (once at a time per address)."""
        if url in self._probing or len(self._probing) >= MAX_INBOUND_PROBES or self._stopping.is_set():
            return
        self._probing.add(url)

        async def probe() -> None:
            try:
                await prober.probe(url, "inbound")
            finally:
                self._probing.discard(url)

        self._spawn(probe())

    async def _shard(self) -> tuple[int, int]:
        k, n = self.config.shard
        if k is not None:
            return k, n
        names = await asyncio.to_thread(replica.own_names)
        found = replica.shard_index(names, n)
        if found is None:
            raise StartError(
                f"partition auto/{n}: no replica ordinal in this host's names ({', '.join(names)}); "
                "give --partition K/N"
            )
        self.partition = f"{found[0]}/{n}"
        self.partition_source = found[1]
        return found[0], n

    async def _start_mdns(self) -> None:
        cfg = self.config
        interfaces = mdns_interfaces(cfg.host, cfg.mdns_interface)
        where = ",".join(interfaces) or "all interfaces"
        try:
            if self._shared_zc is None:
                self._own_zc = make_zeroconf(interfaces)
            self._mdns = MdnsDiscovery(
                self._shared_zc or self._own_zc,
                node_id=self.id,
                port=self.port,
                addresses=advertised_addresses(cfg.host, interfaces),
                identity=self.identity,
                peers=self.peers,
                log=self.log,
            )
            await self._mdns.start()
        except NonUniqueNameException:
            raise StartError(f"node id {self.id!r} is already taken on the network: choose another --id") from None
        except OSError as e:
            raise StartError(f"mDNS on {where}: {e.strerror or e}") from None

    def _spawn(self, coro: Any) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]  # short-lived probes must not pile up
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def stop(self) -> None:
        """Refuse new exchanges, give loops and exchanges in flight STOP_GRACE_S to finish (then cancel
        them), say goodbye on mDNS, then shut the HTTP side (requests in flight get up to 2 s more)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        self.gossiper.close()
        tasks = self._tasks + self.gossiper.tasks
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close()
        self.log.info("node stopped" if self.failure is None else "node stopped after a failure")

    async def _close(self) -> None:
        """Release what start() acquired, in reverse order; safe on a partly started node."""
        if self._mdns is not None:
            await self._mdns.stop()
        if self._own_zc is not None:
            await self._own_zc.async_close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- periodic work ----------------------------------------------------------------------------
    async def _train_round(self) -> None:
        self.train_loss = await asyncio.to_thread(self.learner.train_steps, self.config.steps_per_round)

    async def _evaluate(self) -> None:
        self.last_eval = await asyncio.to_thread(self.learner.evaluate)
        self.log.debug(
            "eval: accuracy=%.4f loss=%.4f age=%d", self.last_eval.accuracy, self.last_eval.loss, self.learner.age
        )

    # -- read side --------------------------------------------------------------------------------
    async def model_payload(self) -> bytes:
        return self.gossiper.encode_state(await asyncio.to_thread(self.learner.snapshot))

    async def model_file(self) -> bytes:
        """The served model as a safetensors file (parameters and buffers; metadata: node, age, task)."""
        state, age = await asyncio.to_thread(self.learner.served_state)
        return modelfile.encode(state, node_id=self.id, age=age, task=self.task.name)

    @property
    def ready(self) -> bool:
        """The served model has been trained or merged at least once (it is no longer the bare initialisation)."""
        return self.learner.trained

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await asyncio.to_thread(serving.predict, self.task, self.learner, inputs)

    async def model_is_finite(self) -> bool:
        return await asyncio.to_thread(serving.outputs_finite, self.task, self.learner)

    def _readings(self) -> Readings:
        st, ev = self.gossiper.stats, self.last_eval
        return Readings(
            initiated={"ok": st.ok, "failed": st.failed, "busy": st.busy, "aborted": st.aborted},
            answered={"ok": st.served, "declined": st.declined, "rejected": st.rejected},
            in_doubt=len(self.gossiper.doubts),
            loop_errors={(n, t): c for n, h in self.supervisor.loops.items() for t, c in h.types.items()},
            loop_rounds={n: h.rounds for n, h in self.supervisor.loops.items()},
            failed=self.failure is not None,
            bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received,
            known_peers=len(self.peers),
            ignored_peers=len(self.peers.ignored()),
            model_age=self.learner.age,
            served_age=self.learner.served_age,
            train_steps=self.learner.steps,
            accuracy=ev.accuracy if ev else None,
            loss=ev.loss if ev else None,
        )

    def status(self) -> dict[str, Any]:
        ev = self.last_eval
        gossip = self.gossiper
        return {
            "id": self.id,
            "protocol": wire.PROTOCOL_VERSION,
            "task": self.task.name,
            "cluster": self.config.cluster,
            "url": self.url,
            "age": self.learner.age,  # steps the model embodies: the most among its merged ancestors
            "steps": self.learner.steps,  # minibatch steps this node made itself
            "merges": self.learner.merges,  # exchanges merged into this node's model
            "partition": self.partition,
            "partition_from": self.partition_source,
            "partition_scheme": self.config.partition_scheme,
            "split": self.identity.split,  # data-seed/shards/scheme: must agree across the cluster
            "init_model": self.identity.init,  # digest of the initial model (training nodes)
            "samples": self.learner.train_size,
            "class_histogram": self.class_histogram,
            # whether local training is going on now (not merely configured)
            "training": "train" in self.supervisor.loops
            and self.supervisor.loops["train"].running
            and not self.failure,
            "failure": self.failure,  # why the node is stopping after a loop could not go on, else null
            "device": str(self.learner.device),
            # the served model (scored in metrics, answered from) is the working copy as of the last merge
            "served": {"age": self.learner.served_age, "local_steps_behind": self.learner.unpublished_steps},
            "merge": {"rule": self.config.merge, "weight": self.learner.weight},
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "model": self.gossiper.model_digest,
            "peers": self.peers.describe(),
            "ignored_peers": self.peers.ignored(),
            "metrics": {
                "accuracy": ev.accuracy if ev else None,
                "loss": ev.loss if ev else None,
                "train_loss": self.train_loss,
            },
            "exchanges": {
                **gossip.stats.as_dict(),
                "in_flight": len(gossip.tasks),
                "prepared": len(gossip.ledger),
                "doubtful": len(gossip.doubts),
            },
            "loops": self.supervisor.describe(),
        }

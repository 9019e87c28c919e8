"""A gossipfl node: HTTP server + discovery + local learner + gossip loop, with a start/stop lifecycle.

Several nodes may share one process and one event loop (pass a shared AsyncZeroconf).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from zeroconf.asyncio import AsyncZeroconf

from gossipfl import assembly
from gossipfl.common.logs import node_logger
from gossipfl.common.supervise import Supervisor
from gossipfl.config import NodeConfig
from gossipfl.discovery.identity import Identity
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.service import Discovery, DiscoveryError
from gossipfl.learning.partition import class_histogram, partition
from gossipfl.learning.registry import get_task, load_checked
from gossipfl.learning.task import Evaluation, Task, with_validation
from gossipfl.protocol import wire
from gossipfl.protocol.gossiper import Gossiper
from gossipfl.serving import modelfile
from gossipfl.serving import predict as serving
from gossipfl.serving.auth import REFUSED_KEY
from gossipfl.serving.httpserver import NodeRunner
from gossipfl.serving.metrics import NodeMetrics, Readings
from gossipfl.serving.routes import build_app

STOP_GRACE_S = 3.0  # on stop, loops and exchanges in flight get this long, then are cancelled
INFERENCE_CONCURRENCY = 2  # inference requests running at once; others wait their turn
INFERENCE_UPLOADS = 8  # inference bodies being received at once; more are answered 503


class StartError(Exception):
    """The node cannot start as configured (port taken, mDNS interface missing, id in use)."""


class Node:
    def __init__(self, config: NodeConfig, *, zeroconf: AsyncZeroconf | None = None, task: Task | None = None):
        self.config = config
        self.task = task or get_task(config.task, config.data)
        self._zeroconf = zeroconf
        self._stopping = asyncio.Event()
        self.failed = asyncio.Event()  # set when a background loop cannot go on (see common/supervise.py)
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.discovery: Discovery | None = None
        self._started = False
        self.last_eval: Evaluation | None = None
        self.inference_slots = asyncio.Semaphore(INFERENCE_CONCURRENCY)
        self.inference_uploads = asyncio.Semaphore(INFERENCE_UPLOADS)
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
            if cfg.eval_split == "validation":  # the test split stays unseen; train less the hold-out
                data = with_validation(data, cfg.data_seed)
            k, n, source = await assembly.resolve_shard(cfg.shard)
            if source is not None:  # auto/N: the replica's ordinal
                self.partition, self.partition_source = f"{k}/{n}", source
            self.shard = partition(data.train.y, n, cfg.partition_scheme, cfg.data_seed)[k]
            local = data.train.subset(self.shard)
            # push-sum weight = local sample count: the consensus becomes the data-weighted mean
            self.learner = assembly.build_learner(self.task, local, data.test, cfg, weight=len(local))
        except ValueError as e:  # TaskError, or a partition that cannot be made
            raise StartError(str(e)) from None
        self.class_histogram = class_histogram(data.train.y, self.shard, data.num_classes)
        self.signature = await asyncio.to_thread(serving.signature, self.task, self.learner, data.num_classes)
        initial = None if cfg.no_train else assembly.initial_model_digest(self.learner)

        try:
            sock = assembly.bind_socket(cfg.host, cfg.port)
        except OSError as e:
            raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        try:
            self.id = assembly.node_id(cfg, self.port)
            self.membership, notes = assembly.membership(cfg, self.id)
            server_ssl = assembly.server_tls(self.membership)
        except ValueError as e:  # SecretError: a key, token or certificate file that cannot be used
            sock.close()
            raise StartError(str(e)) from None
        self.log = node_logger(self.id)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        self.url = f"{self.membership.scheme}://{host}:{self.port}"
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
            membership=self.membership,
            robust=assembly.robust_merge(cfg),
        )
        self.gossiper.on_error = lambda e: self.supervisor.error("gossip", e, in_a_round=False)
        split = f"{cfg.data_seed}/{n}/{cfg.partition_scheme}" + (
            "/validation" if cfg.eval_split == "validation" else ""
        )
        self.identity = Identity(
            self.task.name, self.gossiper.model_digest, cfg.cluster, cfg.merge, split, initial, self.membership.scheme
        )
        self.metrics = NodeMetrics(self._readings, node_id=self.id, task=self.task.name)
        self.gossiper.on_exchange = self.metrics.exchange

        self._runner = NodeRunner(build_app(self, self.membership))
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=server_ssl).start()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=2),
            connector=assembly.tls_connector(self.membership),
        )

        self.discovery = Discovery(
            assembly.discovery_settings(cfg),
            node_id=self.id,
            port=self.port,
            identity=self.identity,
            peers=self.peers,
            session_factory=lambda: self._session,
            log=self.log,
            zeroconf=self._zeroconf,
            membership=self.membership,
        )
        try:
            rounds = await self.discovery.start()
        except DiscoveryError as e:
            raise StartError(str(e)) from None
        for r in rounds:
            self._loop(r.name, r.interval, r.work)
        self.gossiper.on_inbound = lambda sender, url: self.discovery.learn_inbound(url)

        self.started_at = time.monotonic()
        session = self._session
        self._loop("gossip", self.gossiper.next_delay, lambda: self._gossip_round(session), first_wait=True)
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
        for level, note in notes:  # once started: a start that fails says one line, its reason
            self.log.log(level, "%s", note)

    def _loop(self, name: str, interval: Any, work: Any, *, first_wait: bool = False) -> None:
        """A supervised background loop (see common/supervise.py)."""
        loop = self.supervisor.loop(name, interval, self._stopping, work, first_wait=first_wait)
        task = asyncio.get_running_loop().create_task(loop)
        self.supervisor.watch(task, name, self._stopping)
        self._tasks.append(task)

    def _on_fatal(self, reason: str) -> None:
        self.failure = reason
        self.failed.set()

    async def stop(self) -> None:
        """Refuse new exchanges, give loops and exchanges in flight STOP_GRACE_S to finish (then cancel
        them), say goodbye on mDNS, then shut the HTTP side (requests in flight get up to 2 s more)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        self.gossiper.close()
        self.discovery.close()
        tasks = self._tasks + self.gossiper.tasks + self.discovery.tasks
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close()
        self.log.info("node stopped" if self.failure is None else "node stopped after a failure")

    async def _close(self) -> None:
        """Release what start() acquired, in reverse order; safe on a partly started node."""
        if self.discovery is not None:
            await self.discovery.stop()
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

    def _gossip_round(self, session: aiohttp.ClientSession) -> None:
        self.gossiper.round(session)
        # the served model follows the gap between exchanges in force (pacing may lengthen it)
        self.learner.publish_after_steps = assembly.publish_after_steps(self.config, self.gossiper.pace())

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
        st, ev, robust = self.gossiper.stats, self.last_eval, self.gossiper.robust
        return Readings(
            initiated={
                "ok": st.ok,
                "failed": st.failed,
                "busy": st.busy,
                "aborted": st.aborted,
                "unauthorized": st.unauthorized,
            },
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
            refused_requests=dict(self._runner.app[REFUSED_KEY]) if self._runner else {},
            models_clipped=robust.clipped if robust else 0,
            models_too_far=robust.refused if robust else 0,
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
            "split": self.identity.split,  # data-seed/shards/scheme[/validation]: must agree across the cluster
            "eval_split": self.config.eval_split,  # what metrics.accuracy is measured on
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
            "merge": {
                "rule": self.config.merge,
                "weight": self.learner.weight,
                "robust": gossip.robust.describe() if gossip.robust else None,  # --clip-radius
            },
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "model": self.gossiper.model_digest,
            "peers": self.peers.describe(),
            "ignored_peers": self.peers.ignored(),
            # the mechanisms in force (never a secret) and the requests refused with 401, by kind
            "security": {**self.membership.describe(), "refused": dict(self._runner.app[REFUSED_KEY])},
            "metrics": {
                "accuracy": ev.accuracy if ev else None,
                "loss": ev.loss if ev else None,
                "train_loss": self.train_loss,
            },
            "exchanges": {
                **gossip.stats.as_dict(),
                "pace_s": round(gossip.pace(), 4),  # mean seconds between exchanges now (>= --gossip-interval)
                "in_flight": len(gossip.tasks),
                "prepared": len(gossip.ledger),
                "doubtful": len(gossip.doubts),
            },
            "loops": self.supervisor.describe(),
        }

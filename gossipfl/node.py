"""A gossipfl node: HTTP server + discovery + local learner + gossip loop, with a start/stop lifecycle.

Several nodes may share one process and one event loop (pass a shared AsyncZeroconf).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from zeroconf.asyncio import AsyncZeroconf

from gossipfl import assembly, state
from gossipfl.common.chunks import Chunks
from gossipfl.common.logs import node_logger
from gossipfl.common.supervise import Supervisor
from gossipfl.common.timeline import Timeline
from gossipfl.common.units import parse_rate
from gossipfl.config import NodeConfig
from gossipfl.discovery.identity import Identity
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.service import Discovery, DiscoveryError
from gossipfl.learning.checkpoint import CheckpointError
from gossipfl.learning.partition import class_histogram, partition
from gossipfl.learning.privacy import BudgetSpent, LedgerError, PrivacyViolation
from gossipfl.learning.privacy import check_node as check_privacy
from gossipfl.learning.registry import get_task, load_checked
from gossipfl.learning.task import Evaluation, Task, with_validation
from gossipfl.protocol import compress, joining
from gossipfl.protocol.budget import UploadBudget
from gossipfl.protocol.gossiper import Gossiper
from gossipfl.protocol.group import SecureGroup
from gossipfl.report import Reporting
from gossipfl.serving import modelfile
from gossipfl.serving import predict as serving
from gossipfl.serving.httpserver import NodeRunner
from gossipfl.serving.metrics import NodeMetrics
from gossipfl.serving.routes import build_app

EVAL_SHARE = 0.1  # evaluations (which hold the model's lock) take at most this share of a node's time
STOP_GRACE_S = 3.0  # on stop, loops and exchanges in flight get this long, then are cancelled
INFERENCE_CONCURRENCY = 2  # inference requests running at once; others wait their turn
EVAL_POINTS = 600  # evaluations kept for the dashboard (older ones thinned out, see Timeline)
INFERENCE_UPLOADS = 8  # inference bodies being received at once; more are answered 503


class StartError(Exception):
    """The node cannot start as configured (port taken, mDNS interface missing, id in use)."""


class Node(Reporting):
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
        self.group: SecureGroup | None = None  # secure group rounds (--secure-group), or pairwise exchanges
        self._started = False
        self.last_eval: Evaluation | None = None
        self.evals = Timeline(EVAL_POINTS, thin=True)  # the evaluations over the whole run (GET /v1/history)
        self._eval_cost = 0.0  # seconds the last evaluation took (it paces the next, see EVAL_SHARE)
        self.inference_slots = asyncio.Semaphore(INFERENCE_CONCURRENCY)
        self.inference_uploads = asyncio.Semaphore(INFERENCE_UPLOADS)
        self.partition = config.partition  # K/N, resolved at start when it is auto/N
        self.partition_source: str | None = None  # the name whose ordinal gave K (auto/N)
        self.train_loss: float | None = None
        self.started_at: float | None = None
        self.boot = secrets.token_hex(8)  # this run of the node (GET /v1/history)
        self.checkpoints: state.Checkpointer | None = None
        self.resumed: state.Resumed | None = None
        self.join: joining.Joined | str | None = None  # how the node started (see protocol/joining.py)
        self._sock: socket.socket | None = None  # the listening socket until the HTTP site owns it

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
            privacy_note = check_privacy(cfg)  # a DP budget needs --state-dir (its ledger)
            data = await asyncio.to_thread(load_checked, self.task, cfg.data_seed)
            if cfg.eval_split == "validation":  # the test split stays unseen; train less the hold-out
                data = with_validation(data, cfg.data_seed)
            k, n, source = await assembly.resolve_shard(cfg.shard, logging.getLogger("gossipfl"))
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
            self._sock = sock = assembly.bind_socket(cfg.host, cfg.port)
        except OSError as e:
            raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        try:
            self.id = assembly.node_id(cfg, self.port, self.partition_source)
            self.membership, notes = assembly.membership(cfg, self.id)
            server_ssl = assembly.server_tls(self.membership)
        except ValueError as e:  # SecretError: a key, token or certificate file that cannot be used
            raise StartError(str(e)) from None
        self.log = node_logger(self.id)
        if self.learner.privacy is not None:  # DP-SGD: one line at start, one when the budget is spent
            notes.append((logging.INFO, self.learner.privacy.settings.summary()))
            self.learner.privacy.notify = self.log.warning
        if privacy_note:  # DP without --state-dir: counted from zero at every start
            notes.append((logging.WARNING, privacy_note))
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
            codec=compress.parse(cfg.compress),
            upload=UploadBudget(parse_rate(cfg.max_upload_rate) if cfg.max_upload_rate else None),
        )
        self.gossiper.on_error = lambda e: self.supervisor.error("gossip", e, in_a_round=False)
        self.group = assembly.secure_group(cfg, self.gossiper, f"{cfg.seed}/group/{self.id}", notes)
        split = f"{cfg.data_seed}/{n}/{cfg.partition_scheme}" + (
            "/validation" if cfg.eval_split == "validation" else ""
        )
        self.identity = Identity(
            self.task.name, self.gossiper.model_digest, cfg.cluster, cfg.merge, split, initial, self.membership.scheme,
            "group" if self.group else "pairwise",
        )  # fmt: skip
        self.metrics = NodeMetrics(self._readings, node_id=self.id, task=self.task.name)
        self.gossiper.on_exchange = self.metrics.exchange
        if cfg.state_dir:
            expect = {"node_id": self.id, "task": self.task.name, "model": self.identity.model}
            expect.update(cluster=cfg.cluster, split=split, optimizer=cfg.optimizer)
            self.checkpoints = state.Checkpointer(cfg.state_dir, expect, self.log, cfg.checkpoint_interval)
            try:
                self.checkpoints.open()
            except CheckpointError as e:
                raise StartError(str(e)) from None
            g, resume, where = self.gossiper, self.checkpoints.resume, self.checkpoints.dir
            try:  # DP: the write-ahead ledger counts first (a checkpoint's record can only add to it)
                ledger = assembly.open_privacy_ledger(self.learner, where, self.task.name, local, self.partition)
                notes += [(logging.WARNING, ledger)] if ledger else []
                self.resumed = await asyncio.to_thread(resume, self.learner, g.robust, g.ledger, g.clock())
            except (BudgetSpent, LedgerError) as e:  # unreadable ledger, or epsilon already at the budget
                raise StartError(str(e)) from None
        if self.learner.privacy is not None:  # a budget that allows no step (PRV: one it cannot count)
            try:
                await asyncio.to_thread(self.learner.privacy.check_start)
            except (BudgetSpent, ValueError) as e:
                raise StartError(str(e)) from None
        if self.group is not None:  # the model must fit the fixed point; under TLS the certificate signs keys
            try:
                await asyncio.to_thread(self.group.check_start)
            except ValueError as e:
                raise StartError(str(e)) from None
        self.join = None if self._joins() else "skipped"
        if self.join is None:  # from the first request on: no trained peer averages with this untrained model
            self.gossiper.holding = joining.HOLDING

        self._runner = NodeRunner(build_app(self, self.membership))
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=server_ssl).start()
        self._sock = None  # the site's now
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
        if self.resumed is not None:
            self.discovery.recall(self.resumed.peer_urls)

        self.started_at = time.monotonic()
        session = self._session
        exchanges = self.group or self.gossiper  # secure group rounds replace pairwise exchanges
        self._loop("gossip", exchanges.next_delay, lambda: self._gossip_round(session), first_wait=True)
        self._loop("eval", lambda: max(cfg.eval_interval, self._eval_cost / EVAL_SHARE), self._evaluate)
        if self.checkpoints is not None:
            self._loop("checkpoint", cfg.checkpoint_interval, self._checkpoint, first_wait=True)
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
        if self.group is not None:  # rounds not yet masked end now; masked ones may be decided in the grace
            self.group.close()
        self.discovery.close()
        tasks = self._tasks + self.gossiper.tasks + self.discovery.tasks + (self.group.tasks if self.group else [])
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.group is not None:  # what is still undecided is aborted, its hold on merges released
            self.group.abandon()
        if self.checkpoints is not None:  # after every exchange ended: the model no longer changes
            try:
                await self._checkpoint(final=True)
                if self.learner.privacy is not None:  # the ledger: the steps taken, not those reserved
                    await asyncio.to_thread(self.learner.privacy.close)
            except Exception as e:  # (a bug: the node still says goodbye and closes)
                self.log.warning("last checkpoint not written: %s: %s", type(e).__name__, e)
        await self._close()
        self.log.info("node stopped" if self.failure is None else "node stopped after a failure")

    async def _close(self) -> None:
        """Release what start() acquired, in reverse order; safe on a partly started node."""
        if self._sock is not None:
            self._sock.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self.checkpoints is not None:
            self.checkpoints.close()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- periodic work ----------------------------------------------------------------------------
    def _joins(self) -> bool:
        """Whether this node waits for trained peers before its first step: it has no checkpoint, a way to find
        peers, and a merge rule under which adopting a model is sound (push-sum weights are mass: no)."""
        cfg = self.config
        finds = "mdns" in cfg.discovery or bool(cfg.seeds) or bool(cfg.dns_name)
        adopts = cfg.merge != "pushsum" and not cfg.secure_group  # a secure group never reads a member's model
        return self.resumed is None and cfg.join_wait > 0 and adopts and finds and not cfg.no_train

    async def _train_round(self) -> None:
        if self.join is None:  # before the first local step (protocol/joining.py)
            session = self._session
            self.join = await joining.join_when_ready(
                self.gossiper,
                session,
                self.peers.working,
                random.Random(f"{self.config.seed}/join/{self.id}"),
                self.config.join_wait,
                self._stopping,
            )
            if isinstance(self.join, joining.Joined):
                self.log.info("joined: started from %s's model (age %d)", self.join.peer, self.join.age)
            if self._stopping.is_set():
                return
        try:
            self.train_loss = await asyncio.to_thread(self.learner.train_steps, self.config.steps_per_round)
        except PrivacyViolation as e:  # the task bypassed DP-SGD (its step undone): the node fails, exit 1
            self.supervisor.error("train", e)
            self._on_fatal(str(e))

    def _gossip_round(self, session: aiohttp.ClientSession) -> None:
        (self.group or self.gossiper).round(session)
        # the served model follows the gap between exchanges in force (pacing may lengthen it)
        self.learner.publish_after_steps = assembly.publish_after_steps(self.config, self.gossiper.pace())

    async def _checkpoint(self, final: bool = False) -> None:
        """Write a checkpoint if the model changed: not of a node still waiting to join (resuming an untrained
        model would skip the join), and with merges paused while the model and the exchanges committed here
        are copied, so that the two agree."""
        assert self.checkpoints is not None
        g, version = self.gossiper, self.learner.version
        if self.join is None or version == 0 or self.checkpoints.written(version):
            return
        if not await g.pause_merges():
            if final:
                self.log.warning("last checkpoint not written: a merge still held the model after 1 s")
            return  # merges kept going for a second: the next round
        try:
            extras = state.extras(self.peers, g.robust, g.ledger, g.clock())  # on the loop, which owns them
            version = self.learner.version
            saved = await asyncio.to_thread(self.learner.save)
        finally:
            g.resume_merges()
        await asyncio.to_thread(self.checkpoints.write, saved, version, extras)

    async def _evaluate(self) -> None:
        start = time.perf_counter()
        self.last_eval = await asyncio.to_thread(self.learner.evaluate)
        self._eval_cost = time.perf_counter() - start
        self.evals.add(self.evaluation_point(self.last_eval))
        self.log.debug(
            "eval: accuracy=%.4f loss=%.4f age=%d", self.last_eval.accuracy, self.last_eval.loss, self.learner.age
        )

    # -- read side --------------------------------------------------------------------------------
    async def model_payload(self) -> Chunks:
        return self.gossiper.encode_state(await asyncio.to_thread(self.learner.snapshot))

    async def model_file(self) -> Chunks:
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

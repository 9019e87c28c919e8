"""How a node's parts are made from its configuration: the Learner (model, seeds, optimizer, schedule),
the node id, the listening socket. Benchmarks use ``build_learner`` too, for references trained the same
way as a node."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp

from gossipfl.common.retry import patiently
from gossipfl.config import NodeConfig
from gossipfl.discovery import replica
from gossipfl.discovery.service import DiscoverySettings
from gossipfl.learning import privacy
from gossipfl.learning.learner import Learner, build_seeded, resolve_device
from gossipfl.learning.normalize import fit_standardizers, standardizer_buffers
from gossipfl.learning.registry import build_checked
from gossipfl.learning.task import Dataset, Task
from gossipfl.protocol import wire
from gossipfl.protocol.gossiper import Gossiper
from gossipfl.protocol.group import GROUP_ONLY, SecureGroup
from gossipfl.protocol.robust import RobustMerge, parse_radius
from gossipfl.security.membership import Membership
from gossipfl.security.secrets import loosely_protected, read_key_file, read_token
from gossipfl.security.signing import ClusterKey
from gossipfl.security.tls import TlsFiles, own_node_id, server_context

PUBLISH_AFTER_INTERVALS = 3


def build_learner(task: Task, train: Dataset, test: Dataset, cfg: NodeConfig, *, weight: float = 1.0) -> Learner:
    """The Learner a node with this configuration trains: model initialised from ``init_seed(cfg)``, its
    Standardize layers (if any) fitted to ``train``, minibatch order from ``cfg.seed``, optimizer and
    schedule from ``cfg`` (benchmarks use it too, for reference models trained the same way). With DP
    (``--dp-*``, ValueError for a target no noise reaches or a model Opacus cannot train): DP-SGD, and the
    Standardize layers are left as they are: statistics of the shard would be released without noise."""
    dp = privacy.settings(cfg, len(train), cfg.batch_size)
    model = build_seeded(lambda: build_checked(task), init_seed(cfg))
    if dp is None:
        fit_standardizers(model, train.x)  # input statistics from the local shard; the gossip averages them
    engine = None
    if dp is not None:
        from gossipfl.learning.dpsgd import PrivateTraining  # (imports Opacus: only with DP)

        engine = PrivateTraining(dp)
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
        privacy=engine,
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


def publish_after_steps(cfg: NodeConfig, interval: float | None = None) -> int:
    """Local steps after which a node that has not merged serves its working copy: three gossip
    intervals' worth of training (0 with --no-train, where there are no local steps). ``interval``: the
    gap between exchanges in force (``--gossip-interval``, or longer when pacing slows the node)."""
    if cfg.no_train:
        return 0
    gap = cfg.gossip_interval if interval is None else interval
    return round(PUBLISH_AFTER_INTERVALS * gap * cfg.steps_per_round / cfg.train_interval)


def default_node_id(port: int, replica: str | None = None) -> str:
    """``<name>-<port>``: name = the replica name ``auto/N`` found (a compose replica's
    ``<project>-<service>-<index>``, stable when the container is recreated), else the hostname."""
    name = (replica or socket.gethostname()).split(".")[0]
    host = re.sub(r"[^A-Za-z0-9._-]", "-", name) or "node"
    if len(host) > 50:  # keep the end, where a replica's ordinal is: long project names must not merge ids
        host = f"{host[:25]}-{hashlib.sha256(host.encode()).hexdigest()[:8]}-{host[-16:]}"
    return f"{host}-{port}"


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


ORDINAL_PATIENCE_S = 30.0  # auto/N: how long to look for the replica's name (its DNS record may come late)


async def resolve_shard(
    shard: tuple[int | None, int],
    log: logging.Logger | logging.LoggerAdapter | None = None,
    patience: float = ORDINAL_PATIENCE_S,
    names_of: Callable[[], list[str]] = replica.own_names,
) -> tuple[int, int, str | None]:
    """(K, N, source) of ``--partition``: K as given, or for auto/N the ordinal in this host's names and the
    name it came from, looked for again for up to ``patience`` seconds (a compose replica learns its name
    from the DNS record of its own address, which may not be there yet). ValueError when none is found."""
    k, n = shard
    if k is not None:
        return k, n, None

    async def attempt() -> tuple[tuple[int, str] | None, str]:
        names = await asyncio.to_thread(names_of)
        return replica.shard_index(names, n), ", ".join(names)

    def first_miss(names: str) -> None:
        if log is not None:
            log.warning("partition auto/%d: no replica ordinal in %s yet: looking again for up to %.0f s", n, names,
                        patience)  # fmt: skip

    found, names, _ = await patiently(attempt, patience, first_miss)
    if found is None:
        raise ValueError(
            f"partition auto/{n}: no replica ordinal in this host's names ({names}) after {patience:.0f} s; "
            "give --partition K/N"
        )
    return found[0], n, found[1]


def discovery_settings(cfg: NodeConfig) -> DiscoverySettings:
    return DiscoverySettings(
        backends=tuple(cfg.discovery),
        host=cfg.host,
        mdns_interfaces=tuple(cfg.mdns_interface),
        seeds=tuple(cfg.seeds),
        dns_name=cfg.dns_name,
        dns_interval=cfg.dns_interval,
        pex_interval=cfg.pex_interval,
        rng_seed=cfg.seed,
    )


def initial_model_digest(learner: Learner) -> str:
    """The digest of the initial model that nodes of one cluster share (advertised as ``init``): its
    state, less the input statistics each node fitted to its own shard."""
    local = standardizer_buffers(learner.model)
    return wire.state_digest({k: v for k, v in learner.snapshot().params.items() if k not in local})


def node_id(cfg: NodeConfig, port: int, replica: str | None = None) -> str:
    """``--id``; with mutual TLS, the id the node's certificate names (``--id``, if given, must match it);
    else the default id (``replica``: the name ``auto/N`` took the ordinal from)."""
    if cfg.tls_cert:
        certified = own_node_id(cfg.tls_cert)
        if cfg.id is not None and cfg.id != certified:
            raise ValueError(f"id {cfg.id!r}: the certificate {cfg.tls_cert} is for {certified!r}")
        return certified
    return cfg.id or default_node_id(port, replica)


def membership(cfg: NodeConfig, node_id: str) -> tuple[Membership, list[tuple[int, str]]]:
    """The node's membership from its key, certificate and token files (``SecretError``, naming the file,
    when one cannot be used), and (log level, line) of what is worth saying once (never a secret)."""
    notes: list[tuple[int, str]] = []
    key = None
    if cfg.secret_file:
        key = ClusterKey(read_key_file(cfg.secret_file))
        notes.append((logging.INFO, f"members only: cluster key fingerprint {key.key_id} (the same on every member)"))
        if loosely_protected(cfg.secret_file):
            notes.append((logging.WARNING, f"secret-file {cfg.secret_file} can be read by every user: chmod 600 it"))
    tls = None
    if cfg.tls_cert and cfg.tls_key and cfg.tls_ca:
        tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)  # the files are read by server_tls, at start
    token = read_token(cfg.read_token, cfg.read_token_file)
    m = Membership(node_id, key=key, tls=tls, read_token=token, allow=frozenset(cfg.allow_ids) or None)
    if not m.members_only:
        notes.append(
            (
                logging.INFO,
                "running open: no --secret-file or mutual TLS, so any process that reaches this "
                "node can gossip with it (see SECURITY.md)",
            )
        )
    if token is None and m.members_only:
        notes.append((logging.INFO, "no read token: whoever reaches this node can read its model and status"))
    return m, notes


def server_tls(m: Membership) -> ssl.SSLContext | None:
    """The server's SSL context of a node with mutual TLS (SecretError, naming the file, when one of them
    cannot be used); None without."""
    return server_context(m.tls) if m.tls is not None else None


def tls_connector(m: Membership) -> aiohttp.TCPConnector | None:
    """The client connector of a node with mutual TLS (None: aiohttp's default). Each request names the peer
    it expects as its TLS server name (``Membership.client_tls``); where this aiohttp does not key its pool
    by server name, connections are not pooled, so one made for one peer id is never reused for another."""
    if m.tls is None:
        return None
    from aiohttp.client_reqrep import ConnectionKey

    return aiohttp.TCPConnector(force_close="server_hostname" not in getattr(ConnectionKey, "_fields", ()))


def robust_merge(cfg: NodeConfig) -> RobustMerge | None:
    """Self-centred clipping of received models (``--clip-radius``), or None."""
    radius = parse_radius(cfg.clip_radius)
    return None if radius is None else RobustMerge(radius, cfg.refuse_factor, cfg.clip_quantile)


def open_privacy_ledger(learner: Learner, directory: Path, task: str, data: Dataset, partition: str) -> str | None:
    """With DP: the node's write-ahead privacy ledger (``DIR/<id>/privacy.json``, learning/dpledger.py) for
    this shard; its steps count as spent (LedgerError when it exists but cannot be read). Without DP: a
    warning to say at start when the directory has one (training without DP releases that data unbounded)."""
    if learner.privacy is None:
        if (directory / "privacy.json").exists():
            return (
                "this node's data was trained with differential privacy before (privacy.json): without DP now, "
                "its local training has no privacy guarantee"
            )
        return None
    from gossipfl.learning.dpledger import PrivacyLedger, shard_digest  # (imports Opacus: only with DP)

    about = {"task": task, "partition": partition, "records": len(data)}
    learner.privacy.open_ledger(PrivacyLedger(directory, shard_digest(task, data.x, data.y), about))
    return None


def secure_group(cfg: NodeConfig, gossiper: Gossiper, seed: str, notes: list[tuple[int, str]]) -> SecureGroup | None:
    """The node's secure group rounds (``--secure-group K``), or None: pairwise exchanges. A node in groups
    refuses pairwise exchanges (409), which would show its model to one partner in the clear. Adds to
    ``notes`` what is worth saying once at start."""
    if not cfg.secure_group:
        return None
    gossiper.holding = GROUP_ONLY
    if gossiper.membership.tls is None:  # (a read token is required: config.validate)
        why = "round keys are not bound to members: a member acting as initiator can unmask another's model"
        notes.append((logging.WARNING, f"secure-group with a cluster key alone: {why}; use mutual TLS (SECURITY.md)"))
    rng = random.Random(seed)
    return SecureGroup(core=gossiper, size=cfg.secure_group, interval=cfg.gossip_interval, rng=rng)

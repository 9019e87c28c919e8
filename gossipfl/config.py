"""One typed configuration object for a node.

Precedence, highest first: command line > ``GOSSIPFL_<OPTION>`` environment > TOML file (``--config``)
> defaults.  This module is the only place that reads the environment or a config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gossipfl.common.units import parse_rate
from gossipfl.discovery.seeds import parse_hostport
from gossipfl.learning.partition import parse_scheme
from gossipfl.learning.privacy import check_options as check_privacy
from gossipfl.protocol.compress import check_options as check_compress
from gossipfl.protocol.group import check_options as check_secure_group
from gossipfl.protocol.merge import RULES
from gossipfl.protocol.robust import parse_radius

ENV_PREFIX = "GOSSIPFL_"
DISCOVERY_BACKENDS = ("mdns", "static", "dns")
EVAL_SPLITS = ("test", "validation")
GOSSIP_INTERVAL_S = 0.25  # the default of --gossip-interval, also the testbed's (see docs/configuration.md)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names it."""


def _opt(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class NodeConfig:
    port: int = field(default=8470, metadata=_opt("HTTP port (0 picks a free one)"))
    host: str = field(default="0.0.0.0", metadata=_opt("address the HTTP server binds"))
    id: str | None = field(
        default=None,
        metadata=_opt("node id, also the mDNS instance name (default HOST-PORT; REPLICA-PORT with auto/N)"),
    )
    cluster: str = field(
        default="default", metadata=_opt("namespace: nodes only discover and gossip within their cluster")
    )
    task: str = field(
        default="digits", metadata=_opt("digits, digits-cnn, synthetic[:dim=D,classes=C], tabular, or module:factory")
    )
    data: str | None = field(default=None, metadata=_opt("the node's own data file (.npz with x, y, or .csv)"))
    partition: str = field(
        default="0/1",
        metadata=_opt("this node's shard K of N of the training data, 0-based; auto/N: K from the replica's ordinal"),
    )
    partition_scheme: str = field(
        default="iid", metadata=_opt("how the training split is cut: iid, dirichlet:ALPHA or shards:S")
    )
    mdns_interface: tuple[str, ...] = field(
        default=(), metadata=_opt("IPv4 address(es) of the interfaces mDNS uses, comma-separated (default: all)")
    )
    seeds: tuple[str, ...] = field(default=(), metadata=_opt("static peers host:port, comma-separated"))
    discovery: tuple[str, ...] = field(
        default=("mdns",),
        metadata=_opt("discovery backends, comma-separated: mdns, static (implied by --seeds), dns (by --dns-name)"),
    )
    dns_name: str | None = field(
        default=None, metadata=_opt("DNS name whose A records are the peers (a scaled service, a headless Service)")
    )
    dns_interval: float = field(default=5.0, metadata=_opt("seconds between lookups of --dns-name"))
    pex_interval: float = field(
        default=5.0, metadata=_opt("seconds between reads of a random peer's peer list (peer exchange)")
    )
    merge: str = field(default="average", metadata=_opt("merge rule: average, age, samples or pushsum"))
    gossip_interval: float = field(
        default=GOSSIP_INTERVAL_S,
        metadata=_opt("mean seconds between exchanges this node starts (+-20%% jitter; more when they are slow)"),
    )
    compress: str = field(
        default="none",
        metadata=_opt("what exchanges send: none, fp16, bf16, int8 or topk:FRACTION (docs/performance.md)"),
    )
    max_upload_rate: str | None = field(
        default=None,
        metadata=_opt("most bytes per second this node sends in exchanges, on average (10MB/s, 1.5MiB/s, 100Mbit/s)"),
    )
    clip_radius: str | None = field(
        default=None,
        metadata=_opt(
            "robust merging: clip a peer's difference from this model to this norm before merging; auto: the median "
            "of recent distances (ClippedGossip, SECURITY.md)"
        ),
    )
    clip_quantile: float = field(
        default=0.5,
        metadata=_opt(
            "with --clip-radius auto: the quantile of recent distances used as the radius "
            "(keep it below 1 - the share of partners that may be bad)"
        ),
    )
    refuse_factor: float = field(
        default=20.0,
        metadata=_opt(
            "with --clip-radius: refuse (400) a model farther than this many times the recent median; 0: never"
        ),
    )
    state_dir: str | None = field(
        default=None,
        metadata=_opt(
            "directory for checkpoints (this node's in DIR/<id>/): written every checkpoint-interval seconds and at "
            "stop, resumed from at start"
        ),
    )
    checkpoint_interval: float = field(default=30.0, metadata=_opt("seconds between checkpoints (with --state-dir)"))
    join_wait: float = field(
        default=10.0,
        metadata=_opt(
            "a node with no checkpoint waits up to this long for peers before its first local step, and starts from "
            "the model of the most trained one it finds; 0: train at once"
        ),
    )
    no_train: bool = field(default=False, metadata=_opt("do not train: pure averaging"))
    secure_group: int = field(default=0, metadata=_opt("average in secure groups of K >= 3 (docs/privacy.md); 0: off"))
    seed: int = field(default=0, metadata=_opt("this node's seed: minibatch order, peer choice"))
    init_seed: int | None = field(
        default=None,
        metadata=_opt(
            "seed of the initial model: nodes that share it start from the same parameters (default: "
            "--data-seed, the same on every node; with --no-train this node's --seed, so there is something to average)"
        ),
    )
    data_seed: int = field(default=2026, metadata=_opt("cluster-wide seed of the train/test split and partition"))
    optimizer: str = field(default="sgd", metadata=_opt("sgd (with momentum) or adam"))
    lr: float = field(default=0.1, metadata=_opt("learning rate (at age 0, see lr-decay-steps)"))
    momentum: float = field(default=0.9, metadata=_opt("momentum of sgd"))
    lr_decay_steps: float = field(default=1000.0, metadata=_opt("step size lr/(1+age/STEPS); 0 keeps it constant"))
    batch_size: int = field(default=32, metadata=_opt("minibatch size"))
    train_interval: float = field(default=0.1, metadata=_opt("seconds between local training rounds"))
    steps_per_round: int = field(default=2, metadata=_opt("minibatch steps per training round"))
    eval_interval: float = field(default=1.0, metadata=_opt("seconds between evaluations (on --eval-split)"))
    eval_split: str = field(
        default="test",
        metadata=_opt(
            "what a node scores its model on: test (the task's test split) or validation (a seeded 20%% of the "
            "training split, held out on every node before partitioning; for choosing settings)"
        ),
    )
    dp_noise_multiplier: float | None = field(default=None, metadata=_opt("DP-SGD noise SIGMA (docs/privacy.md)"))
    dp_max_grad_norm: float | None = field(default=None, metadata=_opt("DP-SGD per-sample clip norm (default 1)"))
    dp_delta: float | None = field(default=None, metadata=_opt("DP delta (default 1/(10n) rounded down)"))
    dp_epsilon_budget: float | None = field(default=None, metadata=_opt("stop training at this epsilon"))
    dp_target_epsilon: float | None = field(default=None, metadata=_opt("derive SIGMA: this epsilon at --dp-steps"))
    dp_steps: int | None = field(default=None, metadata=_opt("the planned steps of --dp-target-epsilon"))
    dp_accountant: str = field(default="rdp", metadata=_opt("DP accountant: rdp or prv (docs/privacy.md)"))
    dp_secure_rng: bool = field(default=False, metadata=_opt("DP sampling and noise from the OS CSPRNG"))
    secret_file: str | None = field(
        default=None,
        metadata=_opt("cluster key file (>= 32 bytes): only nodes holding it can gossip with this one (SECURITY.md)"),
    )
    tls_cert: str | None = field(default=None, metadata=_opt("this node's certificate (PEM) for mutual TLS"))
    tls_key: str | None = field(default=None, metadata=_opt("this node's private key (PEM) for mutual TLS"))
    tls_ca: str | None = field(default=None, metadata=_opt("the cluster CA certificate (PEM) for mutual TLS"))
    read_token: str | None = field(
        default=None,
        repr=False,
        metadata=_opt("token (Authorization: Bearer) required to read the model, status, metrics, inference"),
    )
    read_token_file: str | None = field(default=None, metadata=_opt("file holding the read token"))
    allow_ids: tuple[str, ...] = field(
        default=(), metadata=_opt("only these node ids may gossip with this node, comma-separated (needs a key or TLS)")
    )
    torch_threads: int = field(default=1, metadata=_opt("torch intra-op threads of a node process"))
    device: str = field(default="auto", metadata=_opt("auto (CUDA when present, else CPU), cpu, cuda or cuda:N"))
    log_format: str = field(default="text", metadata=_opt("text or json"))
    log_level: str = field(default="info", metadata=_opt("debug, info, warning or error"))

    def __post_init__(self) -> None:
        validate(self)

    @property
    def shard(self) -> tuple[int | None, int]:
        return parse_partition(self.partition)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_partition(text: str) -> tuple[int | None, int]:
    """(K, N) from "K/N"; K is None for "auto/N" (the replica's ordinal decides, see discovery/replica.py)."""
    m = re.fullmatch(r"\s*(\d+|auto)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"partition {text!r}: expected K/N (e.g. 0/8) or auto/N")
    k, n = (None if m.group(1) == "auto" else int(m.group(1))), int(m.group(2))
    if n < 1 or (k is not None and not 0 <= k < n):
        raise ConfigError(f"partition {text!r}: needs 0 <= K < N")
    return k, n


_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate(c: NodeConfig) -> None:
    if not 0 <= c.port < 65536:
        raise ConfigError(f"port {c.port}: must be 0..65535")
    if not _ID_RE.match(c.cluster):
        raise ConfigError(f"cluster {c.cluster!r}: 1-63 characters from letters, digits, '.', '_', '-'")
    if c.id is not None and not _ID_RE.match(c.id):
        raise ConfigError(f"id {c.id!r}: 1-63 characters from letters, digits, '.', '_', '-'")
    parse_partition(c.partition)
    try:
        parse_scheme(c.partition_scheme)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for ip in c.mdns_interface:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ConfigError(f"mdns-interface {ip!r}: expected an IPv4 address") from None
    for s in c.seeds:
        try:
            parse_hostport(s)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if "dns" in c.discovery and not c.dns_name:
        raise ConfigError("discovery dns needs --dns-name NAME")
    if c.dns_name is not None and not _DNS_NAME_RE.match(c.dns_name):
        raise ConfigError(f"dns-name {c.dns_name!r}: expected a host name such as gossipfl or nodes.ns.svc")
    unknown = sorted(set(c.discovery) - set(DISCOVERY_BACKENDS))
    if unknown:
        raise ConfigError(f"discovery {','.join(unknown)}: unknown backend (known: {', '.join(DISCOVERY_BACKENDS)})")
    if not c.join_wait >= 0:
        raise ConfigError("join-wait must be >= 0")
    for name in (
        "gossip_interval",
        "train_interval",
        "eval_interval",
        "lr",
        "dns_interval",
        "pex_interval",
        "checkpoint_interval",
    ):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{name.replace('_', '-')} must be > 0")
    if c.merge not in RULES:
        raise ConfigError(f"merge {c.merge!r}: expected one of {', '.join(RULES)}")
    try:
        check_compress(c.compress, c.merge, parse_radius(c.clip_radius) is not None)
        parse_rate(c.max_upload_rate or "1")
    except ValueError as e:
        raise ConfigError(f"{'' if 'compress' in str(e) else 'max-upload-rate '}{e}") from None
    if c.eval_split not in EVAL_SPLITS:
        raise ConfigError(f"eval-split {c.eval_split!r}: expected test or validation")
    if c.optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer {c.optimizer!r}: expected adam or sgd")
    if not 0 <= c.momentum < 1:
        raise ConfigError("momentum must be in [0, 1)")
    if c.lr_decay_steps < 0:
        raise ConfigError("lr-decay-steps must be >= 0")
    for name in ("batch_size", "steps_per_round", "torch_threads"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
    if not _DEVICE_RE.match(c.device):
        raise ConfigError(f"device {c.device!r}: expected auto, cpu, cuda or cuda:N")
    try:
        parse_radius(c.clip_radius)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if parse_radius(c.clip_radius) is not None and c.merge == "pushsum":
        raise ConfigError(
            "clip-radius with merge pushsum: push-sum trusts each partner's weight, which clipping does not bound; "
            "use average, age or samples"
        )
    if not 0 < c.clip_quantile <= 1:
        raise ConfigError("clip-quantile must be in (0, 1]")
    if not c.refuse_factor >= 0:
        raise ConfigError("refuse-factor must be >= 0")
    tls = (c.tls_cert, c.tls_key, c.tls_ca)
    if any(tls) and not all(tls):
        raise ConfigError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    if (c.read_token or c.read_token_file) and not (c.secret_file or c.tls_cert):
        raise ConfigError(
            "read-token needs --secret-file or mutual TLS: members read each other's status and peer lists, and "
            "prove they are members with them"
        )
    try:
        check_secure_group(c)
        check_privacy(c)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.allow_ids and not (c.secret_file or c.tls_cert):
        raise ConfigError("allow-ids needs --secret-file or mutual TLS: without them a node id proves nothing")
    for i in c.allow_ids:
        if not _ID_RE.match(i):
            raise ConfigError(f"allow-ids {i!r}: 1-63 characters from letters, digits, '.', '_', '-'")
    if c.log_format not in ("text", "json"):
        raise ConfigError(f"log-format {c.log_format!r}: expected text or json")
    if c.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log-level {c.log_level!r}: expected debug, info, warning or error")


def _field_kind(f: dataclasses.Field) -> str:
    t = str(f.type)
    if t == "bool":
        return "bool"
    if t in ("int", "int | None"):
        return "int"
    if t in ("float", "float | None"):
        return "float"
    if t.startswith("tuple"):
        return "list"
    return "str"


def option_fields() -> list[dataclasses.Field]:
    return list(fields(NodeConfig))


def _coerce(f: dataclasses.Field, value: Any, origin: str) -> Any:
    """Turn a value from env (always str), TOML (native) or CLI into the field's type."""
    kind = _field_kind(f)
    label = f"{origin} {f.name.replace('_', '-')}"
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if kind in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value) if kind == "int" else float(value)
        if kind == "list":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: cannot read {value!r} as {kind}") from None


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in option_fields():
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            if re.fullmatch(r"(tcp|udp)://[^/]+:\d+", env[key]):  # e.g. GOSSIPFL_PORT=tcp://10.96.0.7:8470
                raise ConfigError(
                    f"environment {key}={env[key]!r} is a Kubernetes service link (a Service named gossipfl in "
                    "this namespace), not an option: set enableServiceLinks: false in the pod spec"
                )
            out[f.name] = _coerce(f, env[key], f"environment {key}:")
    return out


def from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: invalid TOML: {e}") from None
    data = data.get("node", data)  # allow either top-level keys or a [node] table
    by_name = {f.name: f for f in option_fields()}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise ConfigError(f"config {path}: unknown option {key!r}")
        out[name] = _coerce(by_name[name], value, f"config {path}:")
    return out


def load_config(
    cli: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> NodeConfig:
    """Merge the layers. ``cli`` holds only the options given on the command line."""
    env = os.environ if env is None else env
    if config_file is None:
        config_file = env.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_toml(Path(config_file)))
    merged.update(from_env(env))
    by_name = {f.name: f for f in option_fields()}
    merged.update({k: _coerce(by_name[k], v, "option") for k, v in cli.items()})
    return NodeConfig(**merged)

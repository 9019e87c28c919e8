"""Prometheus metrics of one node: one registry per node (several nodes may share a process).

Counters and gauges that mirror the node's own state (exchanges, bytes, peers, model age, accuracy,
train steps) are read at scrape time by a collector, so nothing has to be kept in step; the two
histograms (exchange and inference durations) and the inference counter are observed as events happen.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gossipfl.version import __version__

NAMESPACE = "gossipfl"
EXCHANGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Readings:
    """The node's state at scrape time."""

    initiated: dict[str, int]  # result (ok, failed, busy, aborted) -> exchanges this node started
    answered: dict[str, int]  # result (ok, declined, rejected) -> exchanges peers started
    in_doubt: int  # exchanges whose commit this node sent without hearing the outcome yet
    loop_errors: dict[tuple[str, str], int]  # (loop, exception type) -> errors
    loop_rounds: dict[str, int]  # loop -> rounds completed
    failed: bool  # a loop could not go on: the node is stopping
    bytes_sent: int
    bytes_received: int
    known_peers: int
    ignored_peers: int
    model_age: int
    served_age: int
    train_steps: int
    accuracy: float | None
    loss: float | None
    refused_requests: dict[str, int]  # kind (member, read) -> requests answered 401
    models_clipped: int  # received models clipped toward this node's (--clip-radius)
    models_too_far: int  # received models refused as implausibly far
    checkpoints_written: int = 0  # checkpoints written since start (--state-dir)
    checkpoint_time: float | None = None  # wall-clock time of the last one written, None before any
    group: Any = None  # protocol.groupcore.GroupStats of a node with --secure-group, else None
    privacy_epsilon: float | None = None  # DP-SGD: the epsilon spent; None without DP
    privacy_exhausted: bool | None = None  # DP-SGD: the budget is spent, local training stopped; None without DP
    upload_rate: float = 0.0  # bytes per second sent in exchanges over the last 10 s
    upload_budget: float | None = None  # --max-upload-rate in bytes per second; None without one


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Readings]) -> None:
        self.read = read

    def collect(self) -> list[Metric]:
        r = self.read()
        exchanges = CounterMetricFamily(
            f"{NAMESPACE}_exchanges",
            "Gossip exchanges by role (initiator: this node started it) and result.",
            labels=["role", "result"],
        )
        for result, n in r.initiated.items():
            exchanges.add_metric(["initiator", result], n)
        for result, n in r.answered.items():
            exchanges.add_metric(["responder", result], n)
        out: list[Metric] = [exchanges]
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_exchanges_in_doubt", "Exchanges whose commit was sent, outcome not heard yet.", r.in_doubt
            )
        )
        errors = CounterMetricFamily(
            f"{NAMESPACE}_loop_errors",
            "Errors in rounds of a background loop (train, eval, gossip, pex, seeds, dns), by exception type.",
            labels=["loop", "kind"],
        )
        for (loop, kind), n in sorted(r.loop_errors.items()):
            errors.add_metric([loop, kind], n)
        rounds = CounterMetricFamily(
            f"{NAMESPACE}_loop_rounds", "Rounds of a background loop that completed.", labels=["loop"]
        )
        for loop, n in sorted(r.loop_rounds.items()):
            rounds.add_metric([loop], n)
        out += [errors, rounds]
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_failed", "1 when a loop could not go on and the node is stopping.", r.failed
            )
        )
        out.append(CounterMetricFamily(f"{NAMESPACE}_gossip_sent_bytes", "Gossip bytes sent.", value=r.bytes_sent))
        out.append(
            CounterMetricFamily(f"{NAMESPACE}_gossip_received_bytes", "Gossip bytes received.", value=r.bytes_received)
        )
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_upload_rate_bytes_per_second",
                "Bytes per second this node sent in exchanges over the last 10 s.",
                r.upload_rate,
            )
        )
        if r.upload_budget is not None:
            out.append(
                GaugeMetricFamily(
                    f"{NAMESPACE}_upload_budget_bytes_per_second",
                    "The node's upload budget (--max-upload-rate).",
                    r.upload_budget,
                )
            )
        out.append(CounterMetricFamily(f"{NAMESPACE}_train_steps", "Local minibatch steps.", value=r.train_steps))
        out.append(GaugeMetricFamily(f"{NAMESPACE}_known_peers", "Peers this node may gossip with.", r.known_peers))
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_ignored_peers", "Peers seen but not gossiped with (other task, model or cluster).",
                r.ignored_peers,
            )
        )  # fmt: skip
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_model_age_steps", "Steps the working model embodies (max over merged ancestors).",
                r.model_age,
            )
        )  # fmt: skip
        out.append(
            GaugeMetricFamily(
                f"{NAMESPACE}_served_model_age_steps", "Age of the served model (the working model at the last merge).",
                r.served_age,
            )
        )  # fmt: skip
        refused = CounterMetricFamily(
            f"{NAMESPACE}_requests_unauthorized",
            "Requests refused with 401: member (gossip or a node-to-node read without valid proof of membership), "
            "read (no valid read token).",
            labels=["kind"],
        )
        for kind in ("member", "read"):
            refused.add_metric([kind], r.refused_requests.get(kind, 0))
        out.append(refused)
        out.append(
            CounterMetricFamily(
                f"{NAMESPACE}_models_clipped", "Received models clipped toward this node's (--clip-radius).",
                value=r.models_clipped,
            )
        )  # fmt: skip
        out.append(
            CounterMetricFamily(
                f"{NAMESPACE}_models_refused_too_far", "Received models refused as implausibly far (--refuse-factor).",
                value=r.models_too_far,
            )
        )  # fmt: skip
        out.append(
            CounterMetricFamily(f"{NAMESPACE}_checkpoints_written", "Checkpoints written since start (--state-dir).",
                                value=r.checkpoints_written)
        )  # fmt: skip
        if r.checkpoint_time is not None:
            out.append(
                GaugeMetricFamily(
                    f"{NAMESPACE}_last_checkpoint_timestamp_seconds",
                    "When the last checkpoint was written (Unix time).",
                    r.checkpoint_time,
                )
            )  # fmt: skip
        if r.group is not None:
            out += _group_metrics(r.group)
        if r.privacy_epsilon is not None:
            out.append(
                GaugeMetricFamily(
                    f"{NAMESPACE}_privacy_epsilon",
                    "DP-SGD: epsilon spent so far (delta: /v1/status).",
                    r.privacy_epsilon,
                )
            )
        if r.privacy_exhausted is not None:
            out.append(
                GaugeMetricFamily(
                    f"{NAMESPACE}_privacy_budget_exhausted",
                    "DP-SGD: 1 when the epsilon budget is spent and local training stopped.",
                    float(r.privacy_exhausted),
                )
            )
        if r.accuracy is not None:
            out.append(
                GaugeMetricFamily(f"{NAMESPACE}_test_accuracy_ratio", "Last test accuracy (0 to 1).", r.accuracy)
            )
        if r.loss is not None:
            out.append(GaugeMetricFamily(f"{NAMESPACE}_test_loss", "Last test loss.", r.loss))
        return out


def _group_metrics(g: Any) -> list[Metric]:
    """Secure group rounds (``--secure-group``): rounds by role and outcome, refusals."""
    rounds = CounterMetricFamily(
        f"{NAMESPACE}_group_rounds",
        "Secure group rounds by role (initiator: this node started it; member) and outcome.",
        labels=["role", "outcome"],
    )
    for role, outcome, n in (
        ("initiator", "committed", g.committed), ("initiator", "aborted", g.aborted),
        ("member", "committed", g.joined), ("member", "aborted", g.left),
    ):  # fmt: skip
        rounds.add_metric([role, outcome], n)
    aborts = CounterMetricFamily(
        f"{NAMESPACE}_group_aborts", "Secure group rounds aborted, either role, by reason.", labels=["reason"]
    )
    for reason, n in sorted(g.aborts.items()):
        aborts.add_metric([reason], n)
    return [
        rounds,
        aborts,
        CounterMetricFamily(
            f"{NAMESPACE}_group_messages_rejected", "Secure group messages refused as invalid (4xx).", value=g.rejected
        ),
        CounterMetricFamily(
            f"{NAMESPACE}_group_out_of_range",
            "Rounds this node sat out: a coordinate of its model outside the fixed-point range.",
            value=g.out_of_range,
        ),
    ]


class NodeMetrics:
    def __init__(self, read: Callable[[], Readings], *, node_id: str, task: str) -> None:
        self.registry = CollectorRegistry()
        self.exchange_duration = Histogram(
            f"{NAMESPACE}_exchange_duration_seconds",
            "Duration of exchanges this node started, by result.",
            ["result"],
            buckets=EXCHANGE_BUCKETS,
            registry=self.registry,
        )
        for result in ("ok", "failed", "busy", "aborted", "in_doubt", "unauthorized"):
            self.exchange_duration.labels(result)  # every series exists from the first scrape
        self.inference_requests = Counter(
            f"{NAMESPACE}_inference_requests",
            "Inference requests by model and HTTP status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            f"{NAMESPACE}_inference_duration_seconds",
            "Duration of inference requests that ran the model.",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        Info(f"{NAMESPACE}_build", "gossipfl build and node identity.", registry=self.registry).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "node_id": node_id,
                "task": task,
            }
        )
        self.registry.register(_StateCollector(read))

    def exchange(self, result: str, seconds: float) -> None:
        self.exchange_duration.labels(result).observe(seconds)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asks for (Prometheus text or OpenMetrics)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

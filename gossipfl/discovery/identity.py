"""Who this node can gossip with: the values a peer must share (protocol, cluster, task, model shape,
merge rule, data split), as advertised in mDNS TXT records and ``/v1/status``."""

from __future__ import annotations

from dataclasses import dataclass

PROTO = "2"  # protocol.wire.PROTOCOL_VERSION (checked by a test): nodes of other protocols ignore each other


@dataclass(frozen=True)
class Identity:
    """What a peer must share with this node to be gossiped with: the protocol, cluster, task and model
    shape, and the cluster-wide settings that must agree (merge rule; data split: data seed, number of
    shards and scheme; initial model of training nodes). Advertised in mDNS TXT and ``/v1/status``."""

    task: str
    model: str  # wire.spec_digest of the model's parameter names, dtypes and shapes
    cluster: str = "default"
    merge: str | None = None  # merge rule
    split: str | None = None  # "DATA_SEED/N/SCHEME": how the training data is cut into shards
    init: str | None = None  # digest of the initial model (training nodes only)
    scheme: str = "http"  # https with mutual TLS: nodes of the other scheme cannot reach each other
    exchange: str = "pairwise"  # or "group" (--secure-group): such nodes neither send nor take pairwise exchanges

    def txt(self) -> dict[str, str]:
        out = {"proto": PROTO, "task": self.task, "model": self.model, "cluster": self.cluster, "scheme": self.scheme}
        out.update({k: v for k, v in (("merge", self.merge), ("split", self.split), ("init", self.init)) if v})
        if self.exchange != "pairwise":  # (older nodes do not say: they exchange pairwise)
            out["exchange"] = self.exchange
        return out

    def mismatch(
        self,
        proto: str | None,
        task: str | None,
        model: str | None,
        cluster: str | None,
        merge: str | None = None,
        split: str | None = None,
        scheme: str | None = None,
        exchange: str | None = None,
    ) -> str:
        """Why a node with these values cannot be gossiped with ("" if it can). A value the peer does not
        state is not held against it: the message check still rejects a model of another shape or rule."""
        if cluster != self.cluster:
            return f"cluster {cluster!r}, ours {self.cluster!r}"
        if proto != PROTO:
            return f"protocol {proto!r}, ours {PROTO!r}"
        if task != self.task:
            return f"task {task!r}, ours {self.task!r}"
        if model is not None and model != self.model:
            return f"model shape {model}, ours {self.model}"
        if merge and self.merge and merge != self.merge:
            return f"merge rule {merge!r}, ours {self.merge!r}"
        if split and self.split and split != self.split:
            return f"data split {split} (data-seed/shards/scheme), ours {self.split}"
        if (scheme or "http") != self.scheme:  # nodes that do not say serve http
            return f"scheme {scheme or 'http'}, ours {self.scheme} (mutual TLS on one side only)"
        if (exchange or "pairwise") != self.exchange:
            return f"exchanges {exchange or 'pairwise'}, ours {self.exchange} (--secure-group on one side only)"
        return ""

    def caveat(self, init: str | None) -> str:
        """A difference worth a warning but not a refusal: another initial model (chosen on purpose with
        --init-seed, or made by another torch build from the same seed)."""
        if init and self.init and init != self.init:
            return (
                f"it started from another initial model ({init}, ours {self.init}); averaging models that "
                "did not start together costs accuracy: give every node the same --data-seed or --init-seed"
            )
        return ""

    def mismatch_of(self, found: dict[str, str | None]) -> str:
        """``mismatch`` for a peer described by ``describe_service`` or its ``/v1/status``."""
        keys = ("proto", "task", "model", "cluster", "merge", "split", "scheme", "exchange")
        return self.mismatch(*(found.get(k) for k in keys))

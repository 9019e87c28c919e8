"""What a node says about itself: ``/v1/status`` and the readings behind ``/metrics``. A mixin of ``Node``
(node.py), kept apart so that the node's module holds its lifecycle only."""

from __future__ import annotations

import time
from typing import Any

from gossipfl import state
from gossipfl.learning.privacy import describe_off
from gossipfl.protocol import joining, wire
from gossipfl.serving.auth import REFUSED_KEY
from gossipfl.serving.metrics import Readings


class Reporting:
    """``status()`` and ``_readings()`` over the attributes ``Node`` sets at start."""

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
            bytes_sent=st.bytes_sent + (self.group.stats.bytes_sent if self.group else 0),
            bytes_received=st.bytes_received + (self.group.stats.bytes_received if self.group else 0),
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
            checkpoints_written=self.checkpoints.saves if self.checkpoints is not None else 0,
            checkpoint_time=self.checkpoints.last_saved_at if self.checkpoints is not None else None,
            group=self.group.stats if self.group else None,
            privacy_epsilon=self.learner.privacy.epsilon if self.learner.privacy else None,
            privacy_exhausted=self.learner.privacy.exhausted if self.learner.privacy else None,
            upload_rate=self.gossiper.upload.measured(),
            upload_budget=self.gossiper.upload.rate,
        )

    def evaluation_point(self, ev: Any) -> dict[str, Any]:
        """One evaluation as the dashboard's curves hold it (wall-clock time ``t``; with DP, the epsilon spent)."""
        dp = self.learner.privacy
        return {
            "t": round(time.time(), 3),
            "age": self.learner.age,
            "steps": self.learner.steps,
            "accuracy": ev.accuracy,
            "loss": ev.loss,
            "epsilon": dp.epsilon if dp else None,  # (non-finite numbers leave as null: serving.errors.finite)
        }

    def history(self, evals_after: int = 0, exchanges_after: int = 0) -> dict[str, Any]:
        """``GET /v1/history``: the evaluations (the whole run, thinned further back) and the last exchanges
        (both sides) after the sequence numbers a poller has seen; ``now`` is this node's wall clock, so a
        reader on another clock can tell how long ago each record is."""
        return {
            "id": self.id,
            "boot": self.boot,  # new at every start: a poller that sees it change reads again from 0
            "now": round(time.time(), 3),
            "evals": self.evals.after(evals_after),
            "exchanges": self.gossiper.stats.recent.after(exchanges_after),
        }

    def status(self) -> dict[str, Any]:
        ev = self.last_eval
        gossip = self.gossiper
        dp = self.learner.privacy  # DP-SGD (learning/dpsgd.py), or None
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
            "class_histogram": None if dp else self.class_histogram,  # with DP: counts of local data, not released
            # whether local training is going on now (not merely configured)
            "training": self.join is not None  # not while waiting to join (protocol/joining.py)
            and "train" in self.supervisor.loops
            and self.supervisor.loops["train"].running
            and not self.failure
            and not (dp and dp.exhausted),  # with DP: stopped for good once the budget is spent
            "failure": self.failure,  # why the node is stopping after a loop could not go on, else null
            "device": str(self.learner.device),
            # the served model (scored in metrics, answered from) is the working copy as of the last merge
            "served": {"age": self.learner.served_age, "local_steps_behind": self.learner.unpublished_steps},
            "merge": {
                "rule": self.config.merge,
                "weight": self.learner.weight,
                "robust": gossip.robust.describe() if gossip.robust else None,  # --clip-radius
            },
            "privacy": dp.describe() if dp else describe_off(),  # DP-SGD: the epsilon spent, the budget
            "checkpoint": self.checkpoints.describe() if self.checkpoints is not None else state.disabled(),
            "join": joining.describe(self.join),
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "model": self.gossiper.model_digest,
            "peers": self.peers.describe(),
            "ignored_peers": self.peers.ignored(),
            # the mechanisms in force (never a secret) and the requests refused with 401, by kind
            "security": {**self.membership.describe(), "refused": dict(self._runner.app[REFUSED_KEY])},
            "metrics": {
                "accuracy": ev.accuracy if ev else None,
                "loss": ev.loss if ev else None,
                "train_loss": None if dp else self.train_loss,  # with DP: a loss on private batches, not released
            },
            "exchanges": {
                **gossip.stats.as_dict(),
                "pace_s": round(gossip.pace(), 4),  # mean seconds between exchanges now (>= --gossip-interval)
                "in_flight": len(gossip.tasks),
                "prepared": len(gossip.ledger),
                "doubtful": len(gossip.doubts),
            },
            "upload": {  # what exchanges send (prepares and replies), --compress and --max-upload-rate
                "compress": gossip.codec.spec,
                "rate_bytes_per_s": round(gossip.upload.measured(), 1),  # over the last 10 s
                "max_bytes_per_s": gossip.upload.rate,
                "wait_s": round(gossip.upload.wait(), 3),  # until the budget allows the next message
            },
            "loops": self.supervisor.describe(),
            "group": self.group.describe() if self.group else None,  # secure group rounds (--secure-group)
        }

"""A node's state directory (``--state-dir DIR``): its checkpoint in ``DIR/<node id>/``, written every
``--checkpoint-interval`` seconds and when the node stops, read when it starts.

A checkpoint is two files: ``tensors-<generation>.safetensors`` (the model, the optimizer state, where
the minibatch order stands) and ``state.json`` (counters, push-sum weight, the peer table, the robust
merge's recent distances, and what the checkpoint is for: node id, task, model shape, cluster, data
split). Each is written atomically (temporary file, fsync, rename); the tensors file of a new generation
is written before the JSON that names it, and older generations are removed after, so a crash at any
moment leaves a consistent pair. A checkpoint that cannot be used (corrupt, truncated, another format,
another task, model, cluster or split) is moved to ``aside-<UTC time>/`` with one log line, and the node
starts fresh. A lock file keeps two running nodes from sharing one directory."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gossipfl.common.atomic import fsync_dir, write_atomic
from gossipfl.discovery.peers import PeerTable
from gossipfl.learning.checkpoint import CheckpointError, decode, dumps, encode, loads
from gossipfl.learning.learner import Learner, Saved
from gossipfl.learning.privacy import BudgetSpent
from gossipfl.protocol.ledger import Ledger
from gossipfl.protocol.robust import RobustMerge

META = "state.json"
LOCK = "lock"
_TENSORS = re.compile(r"^tensors-(\d+)\.safetensors$")
# what a checkpoint must agree with to be used (the optimizer: Adam's state is not SGD's)
IDENTITY = ("node_id", "task", "model", "cluster", "split", "optimizer")


def iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _when(value: object) -> float:
    """A checkpoint's ``saved_at``: a Unix time that ``iso`` can show (ValueError otherwise)."""
    t = float(value)  # type: ignore[arg-type]
    if not 0 <= t < 1e11:
        raise ValueError(f"saved_at {value!r} is not a time")
    return t


@dataclass(frozen=True)
class Resumed:
    saved_at: float  # wall-clock time of the checkpoint
    age: int
    steps: int
    peer_urls: tuple[str, ...]  # the peers the node worked with, to probe again at once


class Checkpointer:
    def __init__(
        self,
        root: str | Path,
        expect: dict[str, str],
        log: logging.LoggerAdapter,
        interval: float,
        clock: Any = time.time,
    ) -> None:
        self.dir = Path(root) / expect["node_id"]
        self.expect = expect
        self.log = log
        self.interval = interval
        self.clock = clock
        self._lock_file: IO[bytes] | None = None
        self._writing = threading.Lock()  # one write at a time (a periodic one may outlive its loop at stop)
        self._generation = 0
        self._saved_version: int | None = None  # the learner version last written
        self.saves = 0
        self.last_saved_at: float | None = None
        self.last_error: str | None = None
        self.resumed: Resumed | None = None
        self.set_aside: str | None = None

    # -- the directory ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create the directory and take its lock (CheckpointError: cannot be created, or in use)."""
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700, exist_ok=True)
            self.dir.chmod(0o700)  # a model can reveal its training data: this user only
            f = open(os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600), "a+b")
        except OSError as e:
            raise CheckpointError(f"state-dir {self.dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise CheckpointError(f"state-dir {self.dir} is in use by another running node (same --id?)") from None
        self._lock_file = f
        for stale in self.dir.glob(".*.tmp"):  # a write that a crash cut short
            stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    # -- start: resume ----------------------------------------------------------------------------
    def resume(self, learner: Learner, robust: RobustMerge | None, ledger: Ledger, now: float) -> Resumed | None:
        """Load the checkpoint into ``learner``, ``robust`` and ``ledger`` (the exchanges committed here, their
        ages counted to ``now`` on the ledger's clock); None when there is none, or when it cannot be used:
        then it is moved aside, one line says why, and all three are left as they were (empty). With DP, a
        checkpoint whose epsilon is already at the budget raises ``BudgetSpent`` (the node must not start)."""
        if not (self.dir / META).exists():
            return None
        try:
            doc = loads((self.dir / META).read_bytes())
            for key in IDENTITY:
                if doc.get(key) != self.expect[key]:
                    raise CheckpointError(f"it is for {key} {doc.get(key)!r}, this node has {self.expect[key]!r}")
            name = str(doc.get("tensors_file", ""))
            m = _TENSORS.match(name)
            if m is None:
                raise CheckpointError(f"tensors file {name!r} is not a checkpoint's")
            saved = decode((self.dir / name).read_bytes(), doc)
            saved = dataclasses.replace(saved, privacy=doc.get("privacy"))  # DP: the accountant's record
            saved_at = _when(doc["saved_at"])
            if robust is not None:
                robust.restore(doc.get("robust") or {})
            elapsed = max(self.clock() - saved_at, 0.0)  # the node was down this long
            ledger.restore_committed([(x, a + elapsed) for x, a in doc.get("committed") or []], now)
            learner.load(saved)  # ValueError, changing nothing, when the shapes or the shard differ
            peers = tuple(str(p["url"]) for p in doc.get("peers", []) if isinstance(p, dict) and "url" in p)
        except BudgetSpent:  # not a checkpoint to set aside: the node must not train on this data again
            raise
        except Exception as e:  # whatever is wrong with it, the node starts fresh rather than not at all
            if robust is not None:
                robust.restore({})
            ledger.forget_outcomes()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            self.set_aside = str(self._move_aside())
            self.log.warning(
                "checkpoint in %s not used (%s): moved to %s; starting fresh", self.dir, reason, self.set_aside
            )
            return None
        self._generation = int(m.group(1))
        self._saved_version = None
        self.resumed = Resumed(saved_at, saved.age, saved.steps, peers)
        self.log.info(
            "resumed from the checkpoint of %s: age %d, %d local steps, %d peers to call again",
            iso(saved_at),
            saved.age,
            saved.steps,
            len(peers),
        )
        return self.resumed

    def _move_aside(self) -> Path:
        aside = self.dir / f"aside-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(self.clock()))}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{aside.name.split('.')[0]}.{n}"), n + 1
        aside.mkdir(mode=0o700)
        for f in [self.dir / META, *self.dir.glob("tensors-*.safetensors")]:
            if f.exists():
                shutil.move(str(f), aside / f.name)
        fsync_dir(self.dir)
        return aside

    # -- running: save ----------------------------------------------------------------------------
    def written(self, version: int) -> bool:
        """Whether the learner at ``version`` is what the last checkpoint holds."""
        return version == self._saved_version

    def save(self, learner: Learner, extras: dict[str, Any]) -> bool:
        """Capture and write a checkpoint if the model changed since the last one. Blocking (run it in a
        thread); see ``write``."""
        if self.written(learner.version):
            return False
        version = learner.version
        return self.write(learner.save(), version, extras)

    def write(self, saved: Saved, version: int, extras: dict[str, Any]) -> bool:
        """Write ``saved`` (the learner at ``version``) with ``extras`` (see ``extras``: taken on the event
        loop, which owns them, at the same moment). Blocking; one write at a time. A write that fails (disk
        full, permissions) is logged, once per reason, and the node goes on; the previous checkpoint stays
        whole."""
        with self._writing:
            if version == self._saved_version:
                return False
            now = self.clock()
            privacy = {} if saved.privacy is None else {"privacy": saved.privacy}  # taken with the model
            blob, doc = encode(saved, {**self.expect, "saved_at": now, **extras, **privacy})
            generation = self._generation + 1
            doc["tensors_file"] = tensors = f"tensors-{generation}.safetensors"
            text = dumps(doc)
            try:
                write_atomic(self.dir / tensors, blob)
                write_atomic(self.dir / META, text)
            except OSError as e:
                reason = e.strerror or str(e)
                if reason != self.last_error:
                    self.log.warning("checkpoint not written to %s: %s (the previous one is kept)", self.dir, reason)
                self.last_error = reason
                if not _holds(self.dir / META, text):  # (the JSON may be in place and only its fsync failed)
                    (self.dir / tensors).unlink(missing_ok=True)
                    return False
            for old in self.dir.glob("tensors-*.safetensors"):
                if old.name != tensors:
                    old.unlink(missing_ok=True)
            if self.last_error is not None and self.last_saved_at is not None:
                self.log.info("checkpoint written to %s again", self.dir)
            self._generation, self._saved_version = generation, version
            self.saves += 1
            self.last_saved_at, self.last_error = now, None
            return True

    def describe(self) -> dict[str, Any]:
        r = self.resumed
        return {
            "dir": str(self.dir),
            "interval_s": self.interval,
            "resumed": r is not None,
            "resumed_from": None if r is None else {"saved_at": iso(r.saved_at), "age": r.age, "steps": r.steps},
            "saves": self.saves,
            "last_saved_at": iso(self.last_saved_at),
            "last_error": self.last_error,
            "set_aside": self.set_aside,
        }


def extras(peers: PeerTable, robust: RobustMerge | None, ledger: Ledger, now: float) -> dict[str, Any]:
    """What a checkpoint keeps besides the learner: the peers that work, the robust merge's recent distances,
    the exchanges committed here (``now``: the ledger's clock). Call it on the event loop."""
    return {
        "peers": [{"id": p.id, "url": p.url, "task": p.task, "source": p.source} for p in peers.working()],
        "robust": robust.export() if robust is not None else None,
        "committed": ledger.committed(now),
    }


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def disabled() -> dict[str, Any]:
    """The status of a node without ``--state-dir``."""
    return {
        "dir": None,
        "interval_s": None,
        "resumed": False,
        "resumed_from": None,
        "saves": 0,
        "last_saved_at": None,
        "last_error": None,
        "set_aside": None,
    }

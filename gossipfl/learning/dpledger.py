"""The write-ahead privacy ledger of a DP node: ``DIR/<node id>/privacy.json`` in its state directory, the
DP-SGD steps its local data was (or may have been) trained on, per shard.

Every step is in the ledger, durably (temporary file, fsync, rename, directory fsync), *before* it is
taken: the node reserves a block of steps (about a second's worth), writes the history that includes the
whole block, then takes them. A crash (kill -9, power loss) therefore loses no step from the count: on
restart every reserved step counts as spent, taken or not. A clean stop writes the exact count back.

It is not part of the model checkpoint (state.json), and nothing that sets a checkpoint aside touches it:
another optimizer, cluster or model, a bad tensors file, a run without DP, none of these resets it. It is
keyed by the shard's digest (the training records themselves, task and split included), so other data
(another partition, another data file) starts its own count in the same file, and the old data's count is
still there when it comes back. A ledger that exists but cannot be read stops the start (``LedgerError``):
reset it only on purpose, by deleting the file (docs/privacy.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.common.atomic import write_atomic
from gossipfl.learning.accounting import Run, parse_history
from gossipfl.learning.privacy import LedgerError

FILE = "privacy.json"
FORMAT = 1


def shard_digest(task: str, x: np.ndarray, y: np.ndarray) -> str:
    """What identifies a node's local data: the task's name and the records' bytes, shapes and dtypes."""
    h = hashlib.sha256(task.encode())
    for a in (x, y):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PrivacyLedger:
    """One shard's entry in ``<dir>/privacy.json`` (the other shards' entries are kept as they are)."""

    def __init__(self, directory: Path, digest: str, about: dict[str, Any]) -> None:
        self.path = Path(directory) / FILE
        self.digest = digest
        self.about = about  # for people: task, partition, records
        self._doc: dict[str, Any] = {"format": FORMAT, "shards": {}}

    def read(self) -> list[Run]:
        """This shard's history as recorded ([] when the file or the entry is absent). LedgerError, one line,
        when the file exists but is not a ledger."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise LedgerError(f"privacy ledger {self.path} cannot be read: {e.strerror or e}") from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("shards"), dict):
                raise ValueError(f"not a format-{FORMAT} privacy ledger")
            entry = doc["shards"].get(self.digest)
            history = [] if entry is None else parse_history(entry["history"])
        except (ValueError, TypeError, KeyError) as e:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({e}); the node will not start rather than count from "
                "zero: restore it, or delete it on purpose to reset the count (docs/privacy.md)"
            ) from None
        self._doc = doc
        return history

    def write(self, history: list[Run]) -> None:
        """Record ``history`` for this shard, durably (LedgerError when it cannot be written)."""
        entry = {**self.about, "history": [list(run) for run in history], "steps": sum(r[2] for r in history)}
        doc = {**self._doc, "shards": {**self._doc["shards"], self.digest: entry}}
        try:
            write_atomic(self.path, json.dumps(doc, indent=1).encode())
        except OSError as e:
            raise LedgerError(f"privacy ledger {self.path} not written: {e.strerror or e}") from None
        self._doc = doc

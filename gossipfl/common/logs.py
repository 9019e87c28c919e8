"""Logging: one line per event, tagged with the node id; ``json`` for machines."""

from __future__ import annotations

import json
import logging
import sys
import time

ROOT = "gossipfl"


class _NodeDefault(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": getattr(record, "node", "-"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "text", level: str = "info", stream: object = None) -> None:
    """Configure the ``gossipfl`` logger for a command-line process (not called by library code)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_NodeDefault())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(node)s] %(message)s"))
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def node_logger(node_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(logging.getLogger(ROOT + ".node"), {"node": node_id})

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


def _handler(fmt: str, stream: object) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(_NodeDefault())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(node)s] %(message)s"))
    return handler


def setup_logging(fmt: str = "text", level: str = "info", stream: object = None) -> None:
    """Configure logging for a command-line process (not called by library code): the ``gossipfl`` logger at
    ``level``, and every other logger (aiohttp, zeroconf, asyncio; Python warnings in JSON mode) from warning
    up, all in one format. Handlers that others put on the root logger (a test runner's) are kept."""
    handler = _handler(fmt, stream)
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    others = _handler(fmt, stream)
    others.setLevel(logging.WARNING)
    others.gossipfl = True  # type: ignore[attr-defined]
    top = logging.getLogger()
    top.handlers[:] = [h for h in top.handlers if not getattr(h, "gossipfl", False)] + [others]
    if fmt == "json":
        logging.captureWarnings(True)  # (else warnings print plain text to stderr)


def fatal(message: str, fmt: str = "text", stream: object = None) -> None:
    """A command's last word before it exits non-zero: ``gossipfl: error: ...``, or one JSON object in the
    format of the logs when they are JSON."""
    out = stream or sys.stderr
    if fmt == "json":
        record = logging.LogRecord("gossipfl.cli", logging.CRITICAL, __file__, 0, message, None, None)
        print(JsonFormatter().format(record), file=out)  # type: ignore[call-overload]
    else:
        print(f"gossipfl: error: {message}", file=out)  # type: ignore[call-overload]


def node_logger(node_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(logging.getLogger(ROOT + ".node"), {"node": node_id})

"""Human units for byte rates on the command line: ``--max-upload-rate 10MB/s``."""

from __future__ import annotations

import math
import re

_RATE_RE = re.compile(
    r"^\s*(?P<num>[-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<prefix>[kKMGT]?)(?P<binary>i?)"
    r"(?P<unit>B|bit|bps|)?(?P<per>/s)?\s*$"
)
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BINARY = {"k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_rate(text: str) -> float:
    """Bytes per second from ``text``: a number, an optional SI (k, M, G, T: powers of 1000) or binary (Ki,
    Mi, Gi, Ti: powers of 1024) prefix, an optional unit (B: bytes, the default; bit or bps: bits) and an
    optional ``/s``: ``1e6``, ``500k``, ``10MB/s``, ``1.5 MiB/s``, ``100Mbit/s``, ``8Mbps``. ValueError with a
    one-line message for anything else, and for a rate under 1 byte per second or not finite."""
    m = _RATE_RE.match(text)
    if m is None or (m["binary"] and not m["prefix"]):
        raise ValueError(f"{text!r} is not a rate: expected a number with an optional unit, as in 10MB/s or 1.5MiB/s")
    value = float(m["num"]) * (_BINARY[m["prefix"]] if m["binary"] else _SCALE[m["prefix"]])
    if m["unit"] in ("bit", "bps"):
        value /= 8
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{text!r}: the rate must be a finite number of bytes per second, at least 1")
    return value

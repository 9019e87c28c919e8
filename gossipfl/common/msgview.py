"""A msgpack reader that hands out ``bin`` values as views into the buffer it reads, never as
copies: a model's tensors arrive with ``np.frombuffer`` over the body as it was received.

msgpack-python can only return ``bin`` as ``bytes`` (one copy of every tensor), so the few types a message
uses are read here, strictly: nil, booleans, integers, floats, str (UTF-8), bin, arrays and maps with string
keys, nesting at most ``MAX_DEPTH`` deep, every length checked against what is left of the buffer, nothing
after the value. Extension types are refused. Anything else raises ``ValueError`` naming the offset."""

from __future__ import annotations

import struct

MAX_DEPTH = 32

_FIXED = {  # type byte -> (struct format, size) of a fixed-size scalar
    0xCA: (">f", 4),
    0xCB: (">d", 8),
    0xCC: (">B", 1),
    0xCD: (">H", 2),
    0xCE: (">I", 4),
    0xCF: (">Q", 8),
    0xD0: (">b", 1),
    0xD1: (">h", 2),
    0xD2: (">i", 4),
    0xD3: (">q", 8),
}
_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
_LEN_FMT = {1: ">B", 2: ">H", 4: ">I"}


def loads(buf: bytes | bytearray | memoryview) -> object:
    """The one msgpack value in ``buf``; ``bin`` values are memoryview slices of ``buf`` (writable when ``buf`` is)."""
    view = memoryview(buf).cast("B")
    value, end = _read(view, 0, 0)
    if end != len(view):
        raise ValueError(f"{len(view) - end} bytes after the msgpack value")
    return value


def _need(view: memoryview, pos: int, n: int) -> None:
    if n > len(view) - pos:
        raise ValueError(f"truncated at offset {pos}: {n} bytes needed, {len(view) - pos} left")


def _read(view: memoryview, pos: int, depth: int) -> tuple[object, int]:
    _need(view, pos, 1)
    t = view[pos]
    pos += 1
    if t <= 0x7F:
        return t, pos
    if t >= 0xE0:
        return t - 0x100, pos
    if 0xA0 <= t <= 0xBF:
        return _str(view, pos, t & 0x1F)
    if 0x90 <= t <= 0x9F:
        return _array(view, pos, t & 0x0F, depth)
    if 0x80 <= t <= 0x8F:
        return _map(view, pos, t & 0x0F, depth)
    if t == 0xC0:
        return None, pos
    if t in (0xC2, 0xC3):
        return t == 0xC3, pos
    if t in _FIXED:
        fmt, size = _FIXED[t]
        _need(view, pos, size)
        return struct.unpack_from(fmt, view, pos)[0], pos + size
    if t in _LENGTH:
        size = _LENGTH[t]
        _need(view, pos, size)
        n = struct.unpack_from(_LEN_FMT[size], view, pos)[0]
        pos += size
        if t <= 0xC6:
            _need(view, pos, n)
            return view[pos : pos + n], pos + n
        if t <= 0xDB:
            return _str(view, pos, n)
        return _array(view, pos, n, depth) if t <= 0xDD else _map(view, pos, n, depth)
    raise ValueError(f"msgpack type 0x{t:02x} at offset {pos - 1} is not allowed here")


def _str(view: memoryview, pos: int, n: int) -> tuple[str, int]:
    _need(view, pos, n)
    try:
        return str(view[pos : pos + n], "utf-8"), pos + n
    except UnicodeDecodeError:
        raise ValueError(f"invalid UTF-8 in a string at offset {pos}") from None


def _array(view: memoryview, pos: int, n: int, depth: int) -> tuple[list, int]:
    if depth >= MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    _need(view, pos, n)  # every element takes at least one byte: no list larger than the body
    out = []
    for _ in range(n):
        value, pos = _read(view, pos, depth + 1)
        out.append(value)
    return out, pos


def _map(view: memoryview, pos: int, n: int, depth: int) -> tuple[dict, int]:
    if depth >= MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    _need(view, pos, 2 * n)
    out: dict[str, object] = {}
    for _ in range(n):
        key_at = pos
        key, pos = _read(view, pos, depth + 1)
        if not isinstance(key, str):
            raise ValueError(f"map key at offset {key_at} is not a string")
        if key in out:
            raise ValueError(f"map key {key[:40]!r} repeated at offset {key_at}")
        out[key], pos = _read(view, pos, depth + 1)
    return out, pos

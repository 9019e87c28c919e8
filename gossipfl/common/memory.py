"""Process-wide memory settings for a node, made once at start by the command that runs it (``gossipfl
node``): the edge, not the library.

glibc gives each thread that contends for the allocator an arena of its own (up to 8 per core), and memory
freed in one arena is reused only by allocations in that arena. A node allocates a model-sized buffer on
the event loop (a received body), another in a worker thread (a snapshot), the training thread others:
with a model of 100 MB each arena kept a copy's worth, and a node's peak memory during an exchange was 5.5
times the model above idle instead of 2.8 (``benchmarks/exchange.py``, MALLOC_ARENA_MAX=1 against the
default, docs/performance.md). One arena removes that; the allocations that matter are few and large,
so the lock they share costs nothing measurable."""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Ask glibc's allocator to use at most ``arenas`` arenas; False where there is no glibc (or it said
    no). Call it before threads start allocating."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas))

"""The arithmetic of secure group averaging (pairwise masks, Bonawitz et al. 2017, "Practical secure
aggregation for privacy-preserving machine learning"): pure functions, no I/O, no state.

**Fixed point.** A model is a vector of reals; each coordinate x with |x| <= ``RANGE`` (R = 2**30) is encoded as
the integer round(x * 2**``SCALE_BITS``) (s = 26), in two's complement modulo 2**64. A coordinate outside
[-R, R], or not finite, raises ``OutOfRange``: the member refuses to take part in the round (it is not clipped,
which would silently change the model). The rounding error is at most 2**-27 (7.5e-9) per coordinate.
x * 2**s is exact in float64 (a power of two), |x * 2**s| <= 2**56 rounds exactly to an integer (float64 values
above 2**53 are integers already), and that integer fits an int64: encoding adds only the one rounding.

**No overflow.** Each encoding lies in [-R * 2**s, R * 2**s]; the sum of K of them lies in [-K R 2**s, K R 2**s],
and K <= ``MAX_MEMBERS`` (64) gives K R 2**s <= 2**6 * 2**30 * 2**26 = 2**62 < 2**63, so the sum modulo 2**64,
read as a signed 64-bit integer, is the exact integer sum: decoding never wraps (``assert`` below). Decoding turns
that integer into float64, exact up to a relative 2**-53.

**Masks.** Each pair of members (i, j), i < j by their position in the round's member list, shares a seed:
HKDF-SHA256 over their X25519 shared secret, salted with the round id, with the two ids and the whole member
list as its info (``pair_seed``). The seed keys ChaCha20, whose keystream, read as little-endian uint64, is the
mask m_ij (``mask``; at most ``MAX_COORDINATES``, 2**35, so the cipher's 32-bit block counter never wraps).
Member i sends y_i = enc(x_i) + sum_{j>i} m_ij - sum_{j<i} m_ji (mod 2**64); every m_ij is added once and
subtracted once, so sum_i y_i = sum_i enc(x_i) (mod 2**64) exactly. One y_i alone is enc(x_i) plus a keystream
unknown to whoever lacks one of member i's pair secrets: uniformly random to them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCALE_BITS = 26  # fixed point: a coordinate x travels as round(x * 2**26)
RANGE = float(2**30)  # |x| <= R for every coordinate (a member whose model leaves it refuses the round)
MIN_MEMBERS = 3  # with 2, the mean and one's own model give away the other's
MAX_MEMBERS = 64
KEY_BYTES = 32  # an X25519 public key
ROUND_BYTES = 16  # a round id: 128 random bits
MAX_COORDINATES = 2**35  # ChaCha20's 32-bit block counter covers 2**32 blocks of 64 bytes: 2**35 uint64
INFO = "gossipfl secure group mask v1"
assert MAX_MEMBERS * RANGE * 2**SCALE_BITS < 2**63  # the sum of a full group never wraps (see above)
assert RANGE * 2**SCALE_BITS < 2**63  # one encoding fits an int64


class OutOfRange(ValueError):
    """A coordinate is outside [-RANGE, RANGE] or not finite: it cannot be encoded without wrapping."""


class BadKey(ValueError):
    """The public key of the member at ``position`` cannot be used (not a point, or a low-order one)."""

    def __init__(self, position: int, detail: str) -> None:
        super().__init__(f"member {position}'s key cannot be used: {detail}")
        self.position = position


def encode(values: np.ndarray) -> np.ndarray:
    """The fixed-point encoding of ``values`` (any float array, flattened) as uint64 (two's complement)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~(np.abs(v) <= RANGE)  # NaN compares False: caught too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OutOfRange(f"coordinate {i} is {v[i]!r}, outside [-{RANGE:g}, {RANGE:g}]")
    return np.rint(v * 2.0**SCALE_BITS).astype(np.int64).view(np.uint64)


def decode_sum(total: np.ndarray) -> np.ndarray:
    """The real sum that a uint64 sum of encodings stands for (float64; exact up to float64 rounding)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**SCALE_BITS


def decode_mean(total: np.ndarray, count: int) -> np.ndarray:
    """The mean of ``count`` encoded vectors whose uint64 sum is ``total``."""
    return decode_sum(total) / count


def add(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """The sum modulo 2**64 of uint64 vectors of one length."""
    out: np.ndarray | None = None
    for v in vectors:
        out = np.array(v, dtype=np.uint64) if out is None else out + np.asarray(v, dtype=np.uint64)
    if out is None:
        raise ValueError("no vectors to add")
    return out


def new_key() -> X25519PrivateKey:
    """A fresh X25519 key pair (one per member and round: see docs/privacy.md)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public(raw: bytes) -> X25519PublicKey:
    """A peer's public key from its 32 raw bytes; ValueError when it is not one."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ValueError(f"a public key has {KEY_BYTES} bytes")
    return X25519PublicKey.from_public_bytes(raw)


def pair_seed(own: X25519PrivateKey, theirs: bytes, round_id: bytes, members: Sequence[str], i: int, j: int) -> bytes:
    """The 32-byte mask seed that members ``i`` and ``j`` (positions in ``members``, either order) share in the
    round ``round_id``: HKDF-SHA256 of their X25519 secret, the round id as salt, (members[min], members[max],
    members) as info. ValueError for a key that is not a valid point, or one that gives an all-zero secret
    (a low-order point)."""
    a, b = sorted((i, j))
    if a == b or not 0 <= a < b < len(members):
        raise ValueError("a pair of two distinct members")
    shared = own.exchange(check_public(theirs))  # cryptography refuses an all-zero result (ValueError)
    info = json.dumps([INFO, members[a], members[b], list(members)], separators=(",", ":")).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=round_id, info=info).derive(shared)


def mask(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudorandom uint64 from ``seed``: the ChaCha20 keystream (zero nonce: every seed serves one pair
    in one round) read as little-endian 64-bit integers; ValueError beyond ``MAX_COORDINATES``."""
    if not 0 <= n <= MAX_COORDINATES:
        raise ValueError(f"{n} coordinates: a mask has at most {MAX_COORDINATES}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def apply_masks(encoded: np.ndarray, position: int, seeds: dict[int, bytes]) -> np.ndarray:
    """``encoded`` plus the mask shared with each later member and minus the mask shared with each earlier one
    (``seeds``: the other member's position -> the pair's seed), modulo 2**64."""
    out = np.array(encoded, dtype=np.uint64)
    for other, seed in seeds.items():
        if other == position:
            raise ValueError("a member shares no mask with itself")
        m = mask(seed, out.size)
        if position < other:
            out += m
        else:
            out -= m
    return out


def masked_vector(
    encoded: np.ndarray, own: X25519PrivateKey, keys: Sequence[bytes], round_id: bytes, members: Sequence[str],
    position: int,
) -> np.ndarray:  # fmt: skip
    """What member ``position`` sends: its encoded model masked with every other member's pair mask (``keys``:
    every member's public key, in ``members`` order). BadKey naming the first member whose key cannot be used."""
    if len(keys) != len(members):
        raise ValueError(f"{len(keys)} keys for {len(members)} members")
    seeds = {}
    for j in range(len(members)):
        if j != position:
            try:
                seeds[j] = pair_seed(own, keys[j], round_id, members, position, j)
            except ValueError as e:  # not a point, or a low-order one (an all-zero shared secret)
                raise BadKey(j, str(e) or type(e).__name__) from None
    return apply_masks(encoded, position, seeds)

"""Reading secrets from files (a cluster key, a read token): one clear error naming the file, never the
secret's content."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIN_KEY_BYTES = 32


class SecretError(ValueError):
    """A key, token or certificate file cannot be used; the message names the file and the problem only."""


def read_secret_file(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``, exactly."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecretError(f"{what} {path}: {e.strerror or e}") from None


def read_key_file(path: str | Path) -> bytes:
    """A cluster key: the whole file, byte for byte (copy the same file to every node), at least
    MIN_KEY_BYTES bytes (``head -c 32 /dev/urandom > FILE``)."""
    key = read_secret_file(path, "secret-file")
    if len(key) < MIN_KEY_BYTES:
        raise SecretError(
            f"secret-file {path}: {len(key)} bytes of key material, at least {MIN_KEY_BYTES} needed "
            f"(make one with: head -c {MIN_KEY_BYTES} /dev/urandom > {path})"
        )
    return key


def read_token(token: str | None, token_file: str | Path | None) -> str | None:
    """The read token from ``--read-token`` or ``--read-token-file`` (not both); None when neither is set."""
    if token is not None and token_file is not None:
        raise SecretError("read-token and read-token-file: give one, not both")
    if token_file is not None:
        try:
            text = read_secret_file(token_file, "read-token-file").decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SecretError(f"read-token-file {token_file}: not UTF-8 text") from None
        token = text
    if token is None:
        return None
    if not token or any(not (c.isascii() and c.isprintable()) or c.isspace() for c in token):
        where = f"read-token-file {token_file}" if token_file is not None else "read-token"
        raise SecretError(f"{where}: a token must be non-empty printable ASCII without spaces")
    return token


def loosely_protected(path: str | Path) -> bool:
    """Whether a file this process owns can be read by every user (worth a warning, not a refusal). Files
    owned by someone else are left alone: a mounted Kubernetes or Compose secret is made readable to the
    node's user by whoever mounted it, and the node cannot change that."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.getuid() and bool(st.st_mode & stat.S_IROTH)

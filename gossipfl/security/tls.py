"""Mutual TLS between members: SSL contexts from the node's certificate, key and the cluster CA, and the
node id a peer's certificate binds it to (its subject's common name).

Peers are dialled by address (mDNS, DNS, seeds), so a server's host name is not what is checked: its
certificate must come from the cluster CA and name the node id the client expects, checked in the handshake
(the id is passed as the TLS server name; ``client_context(check_id=True)``). A server asks every
client for a certificate but does not require one at the handshake (inference clients and orchestrators
have none); the routes that only members may use refuse a request without one (``serving.auth``)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossipfl.security.secrets import SecretError


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    for label, path in (("tls-cert", files.cert), ("tls-key", files.key), ("tls-ca", files.ca)):
        if not Path(path).is_file():
            raise SecretError(f"{label} {path}: no such file")
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise SecretError(f"tls-ca {files.ca}: not a PEM CA certificate ({_reason(e)})") from None
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise SecretError(
            f"tls-cert {files.cert} / tls-key {files.key}: cannot be used together ({_reason(e)})"
        ) from None


def _reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, files)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # verified when given; members-only routes require one
    return ctx


def client_context(files: TlsFiles, *, check_id: bool = True) -> ssl.SSLContext:
    """A member's client context: the server's certificate must come from the cluster CA and, with
    ``check_id``, name the node id given as the connection's server name (DNS name in the SAN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, files)
    ctx.check_hostname = check_id
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def canonical(node_id: str) -> bool:
    """Whether ``node_id`` can be bound to a certificate exactly: the handshake compares it as a DNS name,
    without regard to case and ignoring a final dot, so only lowercase ids without one are accepted with TLS
    (else one certificate would answer for several ids)."""
    return node_id == node_id.lower() and not node_id.endswith(".")


def node_id_of(peercert: dict[str, Any] | None) -> str | None:
    """The node id a verified peer certificate (``SSLSocket.getpeercert()``) names: its common name."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def own_node_id(cert_path: str) -> str:
    """The node id this node's own certificate names (its ``--id`` must match it)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as e:
        raise SecretError(f"tls-cert {cert_path}: not a PEM certificate ({_reason(e)})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise SecretError(f"tls-cert {cert_path}: no common name (the node id) in its subject")
    node_id = str(names[0].value)
    if not canonical(node_id):
        raise SecretError(f"tls-cert {cert_path}: node id {node_id!r} must be lowercase and not end with '.'")
    return node_id

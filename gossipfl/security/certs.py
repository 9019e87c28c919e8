"""``gossipfl certs``: a cluster CA and node certificates, with the ``cryptography`` library.

``init DIR`` writes ``ca.crt`` and ``ca.key`` (ECDSA P-256, 10 years); ``issue DIR NODE_ID`` writes
``NODE_ID.crt`` and ``NODE_ID.key`` (2 years), signed by that CA, with the node id as the subject's common
name and as a DNS name (keys are written mode 0600 and never overwritten)."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossipfl.security.secrets import SecretError
from gossipfl.security.tls import canonical

CA_DAYS = 3650
NODE_DAYS = 730
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SecretError(f"{path}: already exists (remove it first to replace it)") from None
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _not_there(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise SecretError(f"{path}: already exists (remove it first to replace it)")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(folder: str | Path, name: str = "gossipfl cluster CA") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _not_there(folder / "ca.key", folder / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _key_pem(key), 0o600)
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return folder / "ca.crt"


def issue(folder: str | Path, node_id: str, days: int = NODE_DAYS) -> tuple[Path, Path]:
    """A certificate for ``node_id`` signed by the CA in ``folder``; (certificate, key) paths."""
    if not _ID_RE.match(node_id) or not canonical(node_id):
        raise SecretError(
            f"node id {node_id!r}: 1-63 characters from lowercase letters, digits, '.', '_', '-', not ending "
            "with '.' (TLS compares ids without regard to case)"
        )
    folder = Path(folder)
    try:
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    except OSError as e:
        raise SecretError(
            f"{folder}: no cluster CA there ({e.strerror or e}); run: gossipfl certs init {folder}"
        ) from None
    except ValueError as e:
        raise SecretError(f"{folder}: ca.crt or ca.key is not readable PEM ({e})") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecretError(f"{folder}/ca.key: expected an EC key made by gossipfl certs init")
    key_path, cert_path = folder / f"{node_id}.key", folder / f"{node_id}.crt"
    _not_there(key_path, cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path

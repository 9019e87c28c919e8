"""Binding a secure group round's X25519 keys to their members with the members' TLS certificates.

Under mutual TLS each node holds a certificate from the cluster CA naming its node id, and the private key
that goes with it. In a secure group round (``protocol/group*.py``) every member signs, with that private key,
the statement (round id, the round's member list, its own id, its X25519 public key for the round); the
initiator relays each member's signature and certificate to every other member. A member checks, for each
other member, that the certificate was issued by the cluster CA (directly, as ``gossipfl certs`` issues them),
is valid now, names the id listed at that position (its subject's common name, as the TLS handshake binds ids),
and that the signature verifies: so an initiator can neither invent a member (it holds no certificate for an id
it made up) nor substitute a key of its own for another member's (it cannot sign as that member).

Under a cluster key alone there is nothing to bind a key to (every member can sign as any id): see
SECURITY.md. Pure but for reading the three files once (``KeyBinder.load``)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from gossipfl.security.secrets import SecretError, read_secret_file
from gossipfl.security.tls import TlsFiles

STATEMENT = "gossipfl secure group key v1"
MAX_CERT_BYTES = 4096  # a relayed certificate (DER): an EC one from ``gossipfl certs`` has about 400
MAX_SIG_BYTES = 512  # a signature: RSA-4096 at most
_CACHE = 256  # certificates already checked, by their DER bytes

_Private = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class Unbound(ValueError):
    """A key's proof does not bind it to the member listed for it; the message says why."""


@dataclass(frozen=True)
class Proof:
    """What binds one member's key: its signature of the statement, and its certificate (DER)."""

    sig: bytes
    cert: bytes


def statement(round_id: str, members: Sequence[str], member: str, key: bytes) -> bytes:
    """What a member signs for a round (``round_id``: 32 hex digits; ``key``: its 32-byte public key)."""
    return json.dumps([STATEMENT, round_id, list(members), member, key.hex()], separators=(",", ":")).encode()


def _sign(private: _Private, data: bytes) -> bytes:
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return private.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(data)
    return private.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())


def _verify(public: object, sig: bytes, data: bytes) -> None:
    """InvalidSignature, or Unbound for a key type that signs nothing here."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, data)
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    else:
        raise Unbound(f"a certificate with a {type(public).__name__} key signs nothing here")


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class KeyBinder:
    """One node's side: it signs its own keys and checks the others' (``load`` from its TLS files)."""

    def __init__(self, node_id: str, private: _Private, cert: x509.Certificate, cas: list[x509.Certificate]) -> None:
        self.node_id, self._private, self._cas = node_id, private, cas
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self._checked: dict[bytes, tuple[str, object, dt.datetime]] = {}  # DER -> (id, public key, expiry)
        if len(self.cert_der) > MAX_CERT_BYTES:
            raise SecretError(
                f"tls-cert: {len(self.cert_der)} bytes, more than a group round relays ({MAX_CERT_BYTES})"
            )
        try:  # this node's own certificate must pass the check every other member will make
            self.check(self.cert_der, node_id)
        except Unbound as e:
            raise SecretError(f"tls-cert cannot bind this node's secure group keys: {e}") from None
        probe = statement("0" * 32, [node_id], node_id, bytes(32))
        try:
            _verify(cert.public_key(), _sign(private, probe), probe)
        except InvalidSignature:
            raise SecretError("tls-key does not match tls-cert") from None

    @classmethod
    def load(cls, files: TlsFiles, node_id: str) -> KeyBinder:
        """From the node's TLS files; SecretError (a ValueError) naming what cannot be used."""
        try:
            private = serialization.load_pem_private_key(read_secret_file(files.key, "tls-key"), password=None)
            cert = x509.load_pem_x509_certificate(read_secret_file(files.cert, "tls-cert"))
            cas = x509.load_pem_x509_certificates(read_secret_file(files.ca, "tls-ca"))
        except (ValueError, TypeError) as e:
            if isinstance(e, SecretError):
                raise
            raise SecretError(f"tls files: not usable PEM ({e})") from None
        if not isinstance(private, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
            raise SecretError(f"tls-key: a {type(private).__name__} cannot sign secure group keys (EC, Ed25519, RSA)")
        return cls(node_id, private, cert, cas)

    def sign(self, round_id: str, members: Sequence[str], key: bytes) -> Proof:
        """This node's proof for its ``key`` in the round."""
        return Proof(_sign(self._private, statement(round_id, members, self.node_id, key)), self.cert_der)

    def verify(self, proof: Proof | None, round_id: str, members: Sequence[str], member: str, key: bytes) -> None:
        """Unbound unless ``proof`` binds ``key`` to ``member`` in this round."""
        if proof is None:
            raise Unbound(f"no certificate and signature for the key of {member!r}")
        public = self.check(proof.cert, member)
        try:
            _verify(public, proof.sig, statement(round_id, members, member, key))
        except InvalidSignature:
            raise Unbound(f"the signature of the key of {member!r} does not verify") from None

    def check(self, der: bytes, member: str) -> object:
        """The public key of a certificate from the cluster CA that names ``member`` and is valid now;
        Unbound otherwise."""
        now = dt.datetime.now(dt.UTC)
        known = self._checked.get(der)
        if known is None:
            known = self._examine(der)
            if len(self._checked) >= _CACHE:
                self._checked.pop(next(iter(self._checked)))
            self._checked[der] = known
        name, public, expiry = known
        if name != member:
            raise Unbound(f"a certificate for {name!r} offered for {member!r}")
        if now > expiry:
            raise Unbound(f"{member!r}'s certificate expired")
        return public

    def _examine(self, der: bytes) -> tuple[str, object, dt.datetime]:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise Unbound(f"not a certificate ({e})") from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Unbound("a certificate outside its validity period")
        for ca in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise Unbound("a certificate not issued by the cluster CA")
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise Unbound("a CA certificate offered as a member's")
        except x509.ExtensionNotFound:
            pass
        name = common_name(cert)
        if name is None:
            raise Unbound("a certificate without a common name (the node id)")
        return name, cert.public_key(), cert.not_valid_after_utc

"""The cluster CA of the replicated store, and the certificates `vlx` makes from it.

The CA's certificate and key live in the database's secret part (a `Credential` of the
reserved owner CA_OWNER, never exported to TOML), so it travels with the database (`vlx db
migrate`) and any holder of a client certificate can issue more. etcd members get a
certificate for their address usable as server and client (peers authenticate each other);
clients (`vlx`, the replicas) get a client-only one. EC P-256, like etcd's own examples.
A TLS directory holds `ca.crt`, `NAME.crt` and `NAME.key`.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import VlxError
from .model import STORE_CA_OWNER as CA_OWNER
from .model import Cluster, Credential

VALID_DAYS = 3650


@dataclasses.dataclass(frozen=True)
class Pair:
    cert: str     # PEM
    key: str      # PEM


def with_ca(cluster: Cluster) -> Cluster:
    """The cluster holding a CA (a new one if it has none yet)."""
    if cluster.credential(CA_OWNER) is not None:
        return cluster
    name = cluster.settings.name if cluster.settings else "virtualinux"
    pair = _issue(f"{name} store CA", None, (), is_ca=True)
    credential = Credential(CA_OWNER, "ca", json.dumps(dataclasses.asdict(pair)))
    return dataclasses.replace(cluster, credentials=cluster.credentials + (credential,))


def ca_of(cluster: Cluster) -> Pair:
    credential = cluster.credential(CA_OWNER)
    if credential is None:
        raise VlxError("the database has no store CA yet: `vlx db tls init` makes one")
    return Pair(**json.loads(credential.secret))


def issue(ca: Pair, name: str, addresses: Sequence[ipaddress.IPv4Address],
          member: bool) -> Pair:
    """A certificate for an etcd member (server and client) or a client only."""
    return _issue(name, ca, addresses, is_ca=False, server=member)


def write(directory: Path, ca: Pair, name: str, pair: Pair) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key"]
    for path, text, mode in zip(paths, (ca.cert, pair.cert, pair.key), (0o644, 0o644, 0o600),
                                strict=True):
        fresh = path.with_name(path.name + ".new")
        fresh.touch(mode=0o600)
        fresh.write_text(text)
        fresh.chmod(mode)
        fresh.replace(path)
    return paths


def _issue(name: str, issuer: Pair | None, addresses: Sequence[ipaddress.IPv4Address],
           is_ca: bool = False, server: bool = False) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer is None:
        issuer_name, signing_key = subject, key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert.encode())
        issuer_name = issuer_cert.subject
        loaded = serialization.load_pem_private_key(issuer.key.encode(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):    # with_ca makes an EC key
            raise VlxError(f"the store CA's key is {type(loaded).__name__}, not an "
                           "elliptic-curve key: the credential was not made by vlx")
        signing_key = loaded
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH]
                                                      if server else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if addresses:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(address) for address in addresses]), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    return Pair(cert.public_bytes(serialization.Encoding.PEM).decode(),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode())

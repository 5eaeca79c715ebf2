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
import functools
import hashlib
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import VlxError
from .model import STORE_CA_OWNER as CA_OWNER
from .model import STORE_NODE_CA_OWNER as NODE_CA_OWNER
from .model import Cluster, Credential, Node, Role

VALID_DAYS = 3650


@dataclasses.dataclass(frozen=True)
class Pair:
    cert: str     # PEM
    key: str      # PEM


def with_ca(cluster: Cluster) -> Cluster:
    """The cluster holding a CA and the node CA it signed (new ones where it has none yet)."""
    name = cluster.settings.name if cluster.settings else "virtualinux"
    if cluster.credential(CA_OWNER) is None:
        pair = _issue(f"{name} store CA", None, (), is_ca=True)
        credential = Credential(CA_OWNER, "ca", json.dumps(dataclasses.asdict(pair)))
        cluster = dataclasses.replace(cluster, credentials=cluster.credentials + (credential,))
    if cluster.credential(NODE_CA_OWNER) is None:
        pair = _issue_node_ca(ca_of(cluster), f"{name} store node CA")
        credential = Credential(NODE_CA_OWNER, "node-ca", json.dumps(dataclasses.asdict(pair)))
        cluster = dataclasses.replace(cluster, credentials=cluster.credentials + (credential,))
    return cluster


def ca_of(cluster: Cluster) -> Pair:
    credential = cluster.credential(CA_OWNER)
    if credential is None:
        raise VlxError("the database has no store CA yet: `vlx db tls init` makes one")
    pair = Pair(**json.loads(credential.secret))
    if not pair.key:
        raise VlxError("this database is a node's local copy, which holds the store CA "
                       "without its key: run `vlx db tls` against the store (--store URL)")
    return pair


def ca_cert(cluster: Cluster) -> str:
    """The store CA's certificate (a local copy has it without the key)."""
    credential = cluster.credential(CA_OWNER)
    if credential is None:
        raise VlxError("the database has no store CA yet: `vlx db tls init` makes one")
    return str(json.loads(credential.secret)["cert"])


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


# Each node's own store certificate. Every replica must be able to hand any node its boot
# files, byte for byte the same, and a database of 10,000 nodes must not carry 10,000
# certificates in every snapshot (about 1 KB each, rewritten with every change). So nothing is
# stored per node: a node's certificate is derived from the node CA and the node's name and
# address. Its key comes from HKDF over the node CA's key; the node CA's key is Ed25519, whose
# signatures are deterministic (RFC 8032), unlike the root CA's ECDSA ones; serial and validity
# are fixed by the same inputs. The node CA is signed by the root CA once (`with_ca`), so etcd,
# which trusts the root, accepts the chain the node presents (its client.crt holds both).
# A node's certificate names it (CN "node NAME", its address as SAN) and is client-only, or
# server and client for a node of role db (its etcd member).


def _issue_node_ca(ca: Pair, name: str) -> Pair:
    key = ed25519.Ed25519PrivateKey.generate()
    issuer_cert = x509.load_pem_x509_certificate(ca.cert.encode())
    signing_key = serialization.load_pem_private_key(ca.key.encode(), password=None)
    if not isinstance(signing_key, ec.EllipticCurvePrivateKey):
        raise VlxError("the store CA's key is not an elliptic-curve key: the credential was "
                       "not made by vlx")
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=VALID_DAYS),
                                 issuer_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(signing_key, hashes.SHA256()))
    return Pair(cert.public_bytes(serialization.Encoding.PEM).decode(),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode())


def node_pair(cluster: Cluster, node: Node) -> Pair | None:
    """The node's store certificate (with the node CA after it) and key, or None when the
    database has no node CA (a store without TLS). The same bytes on every replica."""
    credential = cluster.credential(NODE_CA_OWNER)
    if credential is None:
        return None
    return _node_pair(credential.secret, node.name, str(node.ip), Role.DB in node.roles)


@functools.lru_cache(maxsize=16384)   # a render makes every node's; the next one reuses them
def _node_pair(node_ca_json: str, name: str, address: str, member: bool) -> Pair:
    node_ca = Pair(**json.loads(node_ca_json))
    ca_key = serialization.load_pem_private_key(node_ca.key.encode(), password=None)
    if not isinstance(ca_key, ed25519.Ed25519PrivateKey):
        raise VlxError("the store node CA's key is not Ed25519: the credential was not made "
                       "by vlx (`vlx db tls init` on a database without it makes one)")
    ca_cert = x509.load_pem_x509_certificate(node_ca.cert.encode())
    material = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"virtualinux node certificate",
                    info=f"{name}\0{address}\0{member}".encode()).derive(
        ca_key.private_bytes_raw())
    curve_order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    key = ec.derive_private_key(int.from_bytes(material) % (curve_order - 1) + 1,
                                ec.SECP256R1())
    serial = int.from_bytes(hashlib.sha256(material).digest()[:19]) | 1
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH]
                                                  if member else [])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"node {name}")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(ca_cert.not_valid_before_utc)
            .not_valid_after(ca_cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(address))]), critical=False)
            .sign(ca_key, None))
    chain = cert.public_bytes(serialization.Encoding.PEM).decode() + node_ca.cert
    return Pair(chain, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode())


def without_ca_key(cluster: Cluster) -> Cluster:
    """The cluster as a node's local copy should hold it: the root CA's certificate (a node
    hands it to the nodes it boots) without its key, which only `vlx db tls` needs. The node
    CA's key stays: every replica issues the certificates of the nodes it boots."""
    credential = cluster.credential(CA_OWNER)
    if credential is None:
        return cluster
    cert_only = json.dumps({"cert": json.loads(credential.secret)["cert"], "key": ""})
    return dataclasses.replace(cluster, credentials=tuple(
        Credential(c.owner, c.username, cert_only) if c.owner == CA_OWNER else c
        for c in cluster.credentials))

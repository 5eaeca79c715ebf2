"""Each node's SSH host key: made once by `vlx`, kept in the database's secret part.

A diskless node boots a fresh or re-created snapshot and must still present the same host key,
or every `ssh node1` warns of an impostor. As Warewulf and xCAT do, the management tool makes
the keys, not the node; unlike their defaults (one key pair shared by every node), each node has
its own, so a node that leaks its key cannot impersonate the others.

A key is a `Credential` of owner `@ssh-host-key:NODE` (model.SSH_HOST_KEY_PREFIX): user name
the key type, `ed25519`, secret its 32-byte seed in base64. The seed is the whole private key
(RFC 8032); OpenSSH's key file is made from it where it is installed (initscripts' sshkeys
step), so the database stays small (44 characters a node: 10,000 nodes add 0.4 MB to a
snapshot, OpenSSH key files would add 4 MB) and the per-node cpio that carries it stays
byte-identical on every replica (OpenSSH's file format holds random check bytes). Only Ed25519:
every OpenSSH since 6.5 (2014) accepts it, and the seed is 32 random bytes, so an import of
10,000 nodes makes their keys in milliseconds (RSA keys would take minutes).

Made when a node is added or imported (`with_host_keys`), renewed only by `vlx node keys
--renew`, removed with the node, exported only with `vlx db export --with-secrets`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import VlxError
from .model import SSH_HOST_KEY_PREFIX, Cluster, Credential

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519

# cryptography is imported by the functions that make or read keys, not at module load: every
# replica renders node cpios (seed_of, node_file) and needs none of it, and its import costs a
# node's emulated CPU 0.15-0.3 s before the replica serves.

KEY_TYPE = "ed25519"
SEED_BYTES = 32
# What a node's cpio carries (etc/virtualinux/node/NODE_FILE): "ed25519 SEED-BASE64\n".
NODE_FILE = "ssh-host-key"


def owner(node: str) -> str:
    return SSH_HOST_KEY_PREFIX + node


def new_key(node: str) -> Credential:
    seed = base64.b64encode(os.urandom(SEED_BYTES)).decode()
    return Credential(owner=owner(node), username=KEY_TYPE, secret=seed)


def with_host_keys(cluster: Cluster, renew: Iterable[str] = ()) -> Cluster:
    """The cluster with a host key for every node that has none, and a new one for each node
    named in `renew` (a pure change; nothing else is touched)."""
    renew = set(renew)
    for name in renew:
        cluster.node(name)          # NotFound names an unknown node
    missing = [node.name for node in cluster.nodes
               if node.name in renew or cluster.credential(owner(node.name)) is None]
    if not missing:
        return cluster
    replaced = {owner(name) for name in missing}
    kept = tuple(c for c in cluster.credentials if c.owner not in replaced)
    return dataclasses.replace(cluster, credentials=kept + tuple(new_key(n) for n in missing))


def seed_of(cluster: Cluster, node: str) -> bytes | None:
    credential = cluster.credential(owner(node))
    return None if credential is None else parse_seed(credential.secret, node)


def parse_seed(text: str, node: str) -> bytes:
    try:
        seed = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != SEED_BYTES:
        raise VlxError(f"the SSH host key of {node} is not a base64 Ed25519 seed of "
                       f"{SEED_BYTES} bytes: `vlx node keys --renew {node}` makes a new one")
    return seed


def node_file(seed: bytes) -> bytes:
    """The file a node's cpio carries: key type and seed, nothing the shell would expand."""
    return f"{KEY_TYPE} {base64.b64encode(seed).decode()}\n".encode()


def read_node_file(text: str, node: str) -> bytes:
    kind, _, seed = text.strip().partition(" ")
    if kind != KEY_TYPE:
        raise VlxError(f"the SSH host key handed to {node} is of type {kind!r}, not "
                       f"{KEY_TYPE}")
    return parse_seed(seed, node)


def _key(seed: bytes) -> ed25519.Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def public_line(seed: bytes, comment: str = "") -> str:
    """`ssh-ed25519 AAAA... COMMENT`, as in a .pub file."""
    from cryptography.hazmat.primitives import serialization
    public = _key(seed).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode()
    return f"{public} {comment}".rstrip()


def fingerprint(seed: bytes) -> str:
    """`SHA256:...`, as `ssh-keygen -l` and ssh's first-connection prompt show it."""
    blob = base64.b64decode(public_line(seed).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def private_file(seed: bytes) -> str:
    """OpenSSH's private key file for `seed` (sshd's HostKey); its check bytes are random, so
    two calls differ in bytes but not in the key (`seed_of_private_file` reads it back)."""
    from cryptography.hazmat.primitives import serialization
    return _key(seed).private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()


def seed_of_private_file(text: str) -> bytes | None:
    """The seed of an OpenSSH Ed25519 key file, or None if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    try:
        key = serialization.load_ssh_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return key.private_bytes_raw()


def known_hosts(cluster: Cluster, names: Iterable[str]) -> list[str]:
    """known_hosts lines (`node1,node1.DOMAIN,ADDRESS ssh-ed25519 AAAA...`) of the nodes that
    have a key."""
    lines = []
    for name in names:
        node = cluster.node(name)
        seed = seed_of(cluster, name)
        if seed is not None:
            hosts = ",".join(dict.fromkeys((name, cluster.fqdn(name), str(node.ip))))
            lines.append(f"{hosts} {public_line(seed)}")
    return lines

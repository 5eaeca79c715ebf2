"""Names the storage area derives from the database: volume names, iSCSI names, CHAP logins.

Everything here is a pure function of names the database holds (cluster name, volume name,
owner name), never of device names, so every node computes the same and an export keeps its
name across restarts of tgtd and of the storage node. Netboot reads the same functions to tell
a booting node which initiator name and target to log in with.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import string
from collections.abc import Iterable

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.fields import parse_name
from virtualinux.vvcm.model import Cluster, Credential

# The naming authority of every IQN we make. Date-based and fixed for good: changing it would
# rename every target and initiator of every existing cluster.
IQN_AUTHORITY = "iqn.2026-11.org.virtualinux"
ISCSI_PORT = 3260
# Volumes for nodes are NODE-root, for VMs VM-disk, unless the operator says otherwise.
NODE_SUFFIX = "root"
VM_SUFFIX = "disk"
CHAP_SECRET_LENGTH = 16  # 12..16 is what every initiator accepts (RFC 3720 allows more)

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^(\+)?(\d+)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)


def target_iqn(cluster_name: str, volume: str) -> str:
    """`iqn.2026-11.org.virtualinux:vlxlab.node1-root`: stable for a cluster and volume."""
    return f"{IQN_AUTHORITY}:{cluster_name}.{volume}"


def initiator_iqn(cluster_name: str, owner: str) -> str:
    """`iqn.2026-11.org.virtualinux:vlxlab.node1`: the initiator name `owner` (a node, or the
    host of a VM on its behalf) logs in with; the target's ACL admits only it.

    netboot (`scripts.iscsi_initramfs`) hands the node this very name.
    Initiator and target names live in separate iSCSI namespaces, so a volume that shared an
    owner's name would still not be confused with it.
    """
    return f"{IQN_AUTHORITY}:{cluster_name}.{owner}"


def volume_name(name: str) -> str:
    """`name` if it is a valid volume name (a DNS label), else VlxError saying why."""
    try:
        return parse_name(name)
    except ValueError as err:
        raise VlxError(f"volume name {name!r}: {err}") from None


def snapshot_name(owner: str, suffix: str) -> str:
    name = f"{owner}-{suffix}"
    if len(name) > 63:
        raise VlxError(f"volume name {name!r} is longer than 63 characters: choose a shorter "
                       "--suffix")
    return volume_name(name)


def parse_portal(value: str) -> str:
    """`IP[:PORT]` -> `IP:PORT` (port 3260 unless given)."""
    host, _, port = value.partition(":")
    try:
        number = int(port) if port else ISCSI_PORT
        parts = [int(octet) for octet in host.split(".")]
    except ValueError:
        raise VlxError(f"portal {value!r}: expected IPV4[:PORT]") from None
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts) or not 0 < number < 65536:
        raise VlxError(f"portal {value!r}: expected IPV4[:PORT]")
    return f"{'.'.join(map(str, parts))}:{number}"


def parse_size(value: str, current: int = 0) -> int:
    """`2GiB`, `512M`, `1073741824` -> bytes; `+1G` adds to `current`."""
    match = _SIZE.match(value.strip())
    if not match:
        raise VlxError(f"size {value!r}: expected e.g. 2GiB, 512MiB, +1G or a byte count")
    relative, number, unit, suffix = match.groups()
    if unit and suffix and suffix.lower() == "b":
        # "4GB" would be 4 GiB or 4*10^9 depending on who reads it: neither is guessed.
        raise VlxError(f"size {value!r}: GB, MB, ... are decimal units; write binary ones "
                       f"like {number}{unit.upper()}iB")
    size = int(number) * _UNITS[unit.lower()]
    return current + size if relative else size


def format_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}".replace(".0 ", " ")
    return f"{size} B"


def new_credential(owner: str) -> Credential:
    """A fresh CHAP login for `owner`: user name = owner, a random secret."""
    alphabet = string.ascii_letters + string.digits
    secret = "".join(secrets.choice(alphabet) for _ in range(CHAP_SECRET_LENGTH))
    return Credential(owner=owner, username=owner, secret=secret)


def ensure_credentials(cluster: Cluster, owners: Iterable[str]) -> Cluster:
    """The cluster with a CHAP credential for every owner that has none yet (pure change)."""
    have = {credential.owner for credential in cluster.credentials}
    fresh = tuple(new_credential(owner) for owner in dict.fromkeys(owners) if owner not in have)
    if not fresh:
        return cluster
    return dataclasses.replace(cluster, credentials=cluster.credentials + fresh)


def drop_credentials(cluster: Cluster, owners: Iterable[str]) -> Cluster:
    """The cluster without the credentials of `owners` (pure change)."""
    gone = set(owners)
    return dataclasses.replace(cluster, credentials=tuple(
        c for c in cluster.credentials if c.owner not in gone))

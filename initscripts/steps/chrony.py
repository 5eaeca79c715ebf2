"""20 time: chrony configured from the database.

Every node serves time to the cluster network, takes it from `ntp_servers` (outside, through the
gateway) and peers with a few other nodes; when the outside is unreachable the nodes agree
among themselves in orphan mode (stratum 10), so their clocks never drift apart. Peering with
every node would not scale: each node peers with `PEERS` others picked by a rendezvous hash of
the two names, so the choice is stable when nodes come and go and differs from node to node.
"""

from __future__ import annotations

import hashlib

from virtualinux.vvcm import Cluster, Node

from ..files import SERVICE_FILE_HEADER, plain, write_if_changed
from ..services import restart_if_changed
from ..startup import Boot, Step

CONFIG = "/etc/chrony/chrony.conf"
PEERS = 4
ORPHAN_STRATUM = 10


def _affinity(a: str, b: str) -> bytes:
    low, high = sorted((a, b))   # symmetric, so two nodes tend to pick each other
    return hashlib.blake2b(f"{low}\0{high}".encode(), digest_size=8).digest()


def peers_of(cluster: Cluster, node: Node, count: int = PEERS) -> list[Node]:
    others = [other for other in cluster.nodes if other.name != node.name]
    return sorted(others, key=lambda other: _affinity(node.name, other.name))[:count]


def chrony_conf(cluster: Cluster, node: Node) -> str:
    settings = cluster.settings
    lines = [SERVICE_FILE_HEADER]
    for server in settings.ntp_servers if settings else ():
        lines.append(f"server {plain(server, 'NTP server')} iburst")
    for peer in peers_of(cluster, node):
        lines.append(f"peer {plain(peer.ip, 'node address')}")
    if settings is not None:
        lines.append(f"allow {plain(settings.cidr, 'cluster network')}")
    lines += [f"local stratum {ORPHAN_STRATUM} orphan",
              "driftfile /var/lib/chrony/chrony.drift",
              "makestep 1.0 3",
              "rtcsync"]
    return "\n".join(lines) + "\n"


def run(boot: Boot) -> str:
    changed = write_if_changed(boot.path(CONFIG), chrony_conf(boot.cluster, boot.node))
    restart_if_changed(boot, "chrony.service", changed)
    settings = boot.cluster.settings
    servers = len(settings.ntp_servers) if settings else 0
    peers = len(peers_of(boot.cluster, boot.node))
    return (f"chrony: {servers} server{'s' if servers != 1 else ''}, {peers} "
            f"peer{'s' if peers != 1 else ''}, orphan stratum {ORPHAN_STRATUM}"
            f"{'' if changed else ' (unchanged)'}")


STEP = Step(name="time", order=20, run=run, needs=("identity",), makes=CONFIG)

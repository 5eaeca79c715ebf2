"""What a lab will be, worked out from the database before anything is made.

`plan(cluster, ...)` picks the nodes to boot, the namespaces' names, and the replicas'
addresses and MACs (with `image="node"`: one replica, the bootstrap's, and the SAN's
address; and the gateway nodes' uplink NICs), and refuses (VlxError, exit 2) what the lab
cannot run: a cluster network
outside the benchmarking range 198.18.0.0/15 (lab traffic never uses other addresses, LAB.md),
a node address outside the cluster network, two nodes with one MAC or one address, or no free
address left for the replicas. It is pure, so all of that is tested without root.

Imports the model only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from pathlib import Path

from virtualinux.vvcm import Cluster, Node, VlxError

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
DEFAULT_STATE_DIR = Path("/run/virtualinux/lab")
NAMESPACE_PREFIX = "vlxlab"
DEFAULT_REPLICAS = 2
BRIDGE = "br0"
REPLICA_INTERFACE = "eth0"
# Locally administered (bit 1 of the first octet), so never a real card's, and never one of
# QEMU's 52:54:00 MACs that the inventory uses.
REPLICA_MAC_BASE = "02:76:6c:78:00:"
# A gateway node's uplink NIC: the node's boot MAC with 52:54:01 for QEMU's 52:54:00.
UPLINK_MAC_BASE = "52:54:01:"
# The name the node image gives a gateway node's uplink NIC: the kernel's name (the image
# keeps kernel names, virtualinux-base), and the uplink NIC sits at a PCI slot after the boot
# NIC's (qemu.UPLINK_PCI_SLOT), so it is probed second on either firmware.
GUEST_UPLINK = "eth1"


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    name: str                       # r1, r2, ...
    namespace: str
    address: ipaddress.IPv4Address
    mac: str
    prefixlen: int

    @property
    def interface_address(self) -> str:
        """address/prefixlen, set on the replica's veth."""
        return f"{self.address}/{self.prefixlen}"


@dataclasses.dataclass(frozen=True)
class NodePlan:
    node: Node
    tap: str
    # With the node image, a gateway node's second NIC on the uplink segment (its tap, MAC).
    uplink_tap: str | None = None
    uplink_mac: str | None = None


@dataclasses.dataclass(frozen=True)
class LabPlan:
    state_dir: Path
    prefix: str
    hub: str                        # the namespace holding the bridge and the nodes' taps
    nodes: tuple[NodePlan, ...]
    replicas: tuple[ReplicaPlan, ...]
    firmware: str
    image: str = "tiny"
    # With the node image: the lab SAN's address (its tgtd's portal); replicas[0] is the
    # bootstrap (one replica and the first etcd member).
    san: ipaddress.IPv4Address | None = None

    @property
    def bootstrap(self) -> ReplicaPlan:
        return self.replicas[0]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.hub, *(replica.namespace for replica in self.replicas))


def namespace_prefix(state_dir: Path) -> str:
    """`vlxlab` for the default state directory; a short hash of the path for any other, so
    two labs (a test's and the user's) never share a namespace name."""
    resolved = Path(state_dir).resolve()
    if resolved == DEFAULT_STATE_DIR:
        return NAMESPACE_PREFIX
    return NAMESPACE_PREFIX + hashlib.sha256(str(resolved).encode()).hexdigest()[:6]


def plan(cluster: Cluster, state_dir: Path, node_count: int | None = None,
         replica_count: int = DEFAULT_REPLICAS, firmware: str = "bios",
         image: str = "tiny") -> LabPlan:
    settings = cluster.settings
    if settings is None or not cluster.nodes:
        raise VlxError("the inventory has no cluster settings or no nodes: nothing to boot",
                       "--inventory")
    if not settings.cidr.subnet_of(LAB_RANGE):
        raise VlxError(f"the cluster network {settings.cidr} is outside {LAB_RANGE}, the only "
                       "range the lab may use (LAB.md): give the lab an inventory on it",
                       "--inventory")
    if node_count is not None and not 1 <= node_count <= len(cluster.nodes):
        raise VlxError(f"must be between 1 and {len(cluster.nodes)} (the inventory's nodes)",
                       "--nodes")
    if replica_count < 1:
        raise VlxError("the lab needs at least one replica", "--replicas")
    _check_nodes(cluster)
    nodes = cluster.nodes[:node_count] if node_count else cluster.nodes
    if image == "node":
        replica_count = 1
    # The node image's lab also needs an address for its SAN.
    addresses = free_addresses(cluster, replica_count + (image == "node"))
    san = addresses.pop() if image == "node" else None
    prefix = namespace_prefix(state_dir)
    macs = {node.mac.lower() for node in cluster.nodes}
    replicas = []
    for index, address in enumerate(addresses, start=1):
        mac = f"{REPLICA_MAC_BASE}{index:02x}"
        if mac in macs:
            raise VlxError(f"replica r{index}'s MAC {mac} is a node's MAC in the inventory: "
                           f"the lab keeps {REPLICA_MAC_BASE}xx for its replicas",
                           "--inventory")
        name = "boot" if image == "node" else f"r{index}"
        replicas.append(ReplicaPlan(name, f"{prefix}-{name}", address, mac,
                                    settings.cidr.prefixlen))
    return LabPlan(state_dir=Path(state_dir), prefix=prefix, hub=f"{prefix}-net",
                   nodes=tuple(_node_plan(cluster, node, i, image)
                               for i, node in enumerate(nodes)),
                   replicas=tuple(replicas), firmware=firmware, image=image, san=san)


def _node_plan(cluster: Cluster, node: Node, index: int, image: str) -> NodePlan:
    """With the node image, a gateway node with an uplink address also gets an uplink NIC:
    the gateway pair runs on the nodes themselves (the tiny image's on the lab's replicas)."""
    settings = cluster.settings
    assert settings is not None
    if image != "node" or not settings.gateway_uplink or node.uplink_address is None or \
            not node.is_gateway:
        return NodePlan(node, f"tap{index}")
    if settings.gateway_uplink != GUEST_UPLINK:
        raise VlxError(f"the lab gives gateway node {node.name} its uplink as {GUEST_UPLINK} "
                       f"(its second NIC), but gateway_uplink is {settings.gateway_uplink}: set "
                       f"gateway_uplink = \"{GUEST_UPLINK}\"", "--inventory")
    mac = UPLINK_MAC_BASE + node.mac[len(UPLINK_MAC_BASE):]
    if mac in {other.mac.lower() for other in cluster.nodes}:
        raise VlxError(f"{node.name}'s uplink MAC {mac} is a node's MAC in the inventory: the "
                       f"lab keeps {UPLINK_MAC_BASE}xx:xx:xx for the gateways' uplinks",
                       "--inventory")
    return NodePlan(node, f"tap{index}", uplink_tap=f"up{index}", uplink_mac=mac)


def _check_nodes(cluster: Cluster) -> None:
    settings = cluster.settings
    assert settings is not None
    by_mac: dict[str, str] = {}
    by_ip: dict[ipaddress.IPv4Address, str] = {}
    for node in cluster.nodes:
        if node.ip not in settings.cidr:
            raise VlxError(f"node {node.name}'s address {node.ip} is outside the cluster "
                           f"network {settings.cidr}", "--inventory")
        other = by_mac.setdefault(node.mac.lower(), node.name)
        if other != node.name:
            raise VlxError(f"MAC clash: {node.name} and {other} both have MAC {node.mac}",
                           "--inventory")
        other = by_ip.setdefault(node.ip, node.name)
        if other != node.name:
            raise VlxError(f"address clash: {node.name} and {other} both have {node.ip}",
                           "--inventory")
        if int(node.mac.split(":")[0], 16) & 1:
            raise VlxError(f"node {node.name}'s MAC {node.mac} is a multicast address, which "
                           "no NIC can have", "--inventory")


def free_addresses(cluster: Cluster, count: int) -> list[ipaddress.IPv4Address]:
    """`count` addresses of the cluster network that no node and no gateway holds, from the
    top down (inventories number nodes from the bottom)."""
    settings = cluster.settings
    assert settings is not None
    taken = {node.ip for node in cluster.nodes} | {settings.gateway_vip}
    found: list[ipaddress.IPv4Address] = []
    for address in reversed(list(settings.cidr.hosts())):
        if address not in taken:
            found.append(address)
            if len(found) == count:
                return found
    raise VlxError(f"no free address for the lab's {count} boot-service replicas in "
                   f"{settings.cidr}: its nodes and the gateway take "
                   f"{len(taken)} of its {settings.cidr.num_addresses - 2} addresses",
                   "--inventory")

"""Which networks a DHCP replica hands addresses on, and who is on each.

`served_networks(cluster)`: the cluster network with its nodes, on the replica's interface and
from relays; and every VC's network with its VMs, each on the VC's bridge (`vlxbrID`) only,
where the server is the VC's service address (vvcm.virt.network.service_address, the same on
every node hosting the VC; the bridge is local to each, so it acts like an anycast gateway and
every hosting node answers a VM the same). A VM gets its address, the service address as DNS
server, and the VC's domain (`VC.DOMAIN`, also as search list, option 119) so VMs find each
other by short name; no router (a VC is private) and no boot file. A node is told three other
nodes as DNS servers (`dns_servers`). An unknown MAC gets the discovery pool address its MAC
hashes to (`Network.pool_host`), the same on every replica. Built once a generation, at the
DHCP service's reload; `bootsvc.dhcp` answers from it.
Imports the model, `dhcp_wire` (MAC parsing) and `vc_links` (which VC bridges exist).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools

from virtualinux.vvcm import Cluster, Node

from . import dhcp_wire as wire
from .vc_links import vc_interfaces

# Resolvers use three name servers at most (glibc's MAXNS), and a list of every node would not
# fit in a DHCP packet on a big cluster: each host is told three other nodes, chosen by its
# position so the load spreads over all of them.
DNS_SERVERS_PER_HOST = 3


@dataclasses.dataclass(frozen=True)
class Host:
    mac: bytes
    ip: ipaddress.IPv4Address
    name: str
    dns: tuple[ipaddress.IPv4Address, ...]


@dataclasses.dataclass(frozen=True)
class Network:
    """A network this replica hands addresses on, and everything its answers carry."""

    name: str
    cidr: ipaddress.IPv4Network
    router: ipaddress.IPv4Address | None
    ntp: tuple[ipaddress.IPv4Address, ...]
    domain: str
    lease_time: int
    hosts: dict[bytes, Host]   # by MAC
    pool: tuple[ipaddress.IPv4Address, int] | None = None   # first address, size
    # A VC network: the bridge it is served on only, and the server's address there (the
    # cluster network: None, the replica's interface and address).
    interface: str | None = None
    server: ipaddress.IPv4Address | None = None

    def pool_host(self, mac: bytes) -> Host | None:
        """The host an unknown MAC is while the metamaster learns it: the pool address its
        MAC hashes to, so every replica offers the same one without sharing leases."""
        if self.pool is None:
            return None
        first, size = self.pool
        index = int.from_bytes(hashlib.sha256(mac).digest()[:8], "big") % size
        # islice, not list(): an unknown MAC must not cost a copy of every host.
        dns = tuple(host.ip for host in itertools.islice(self.hosts.values(),
                                                         DNS_SERVERS_PER_HOST))
        return Host(mac, first + index, "new-" + mac.hex(), dns)

    def contains(self, address: bytes) -> bool:
        return ipaddress.IPv4Address(address) in self.cidr


def served_networks(cluster: Cluster) -> tuple[Network, ...]:
    """The cluster network with its nodes, then each VC's network with its VMs."""
    settings = cluster.settings
    if settings is None:
        return ()
    nodes = cluster.nodes
    hosts = {}
    for index, node in enumerate(nodes):
        mac = wire.parse_mac(node.mac)
        hosts[mac] = Host(mac, node.ip, node.name, dns_servers(nodes, index))
    pool = None
    if settings.discovery_pool is not None:
        first, last = settings.discovery_pool
        pool = (first, int(last) - int(first) + 1)
    networks = [Network(name="cluster", cidr=settings.cidr, router=settings.gateway_vip,
                        ntp=settings.ntp_servers, domain=settings.domain,
                        lease_time=settings.lease_time, hosts=hosts, pool=pool)]
    for bridge, served in vc_interfaces(cluster).items():
        server = served.address.ip
        vms = cluster.vms_of(served.vc)
        if any(vm.ip == server for vm in vms):
            continue    # defined before the address was reserved: nothing to serve it from
        vm_hosts = {}
        for vm in vms:
            mac = wire.parse_mac(vm.mac)
            vm_hosts[mac] = Host(mac, vm.ip, vm.name, (server,))
        networks.append(Network(name=f"vc {served.vc}", cidr=served.address.network,
                                router=None, ntp=(), domain=cluster.fqdn(served.vc),
                                lease_time=settings.lease_time, hosts=vm_hosts,
                                interface=bridge, server=server))
    return tuple(networks)


def dns_servers(nodes: tuple[Node, ...], index: int) -> tuple[ipaddress.IPv4Address, ...]:
    """The nodes after `index` (wrapping round), not the node itself: its own DNS replica
    is not running yet while it boots."""
    others = min(DNS_SERVERS_PER_HOST, len(nodes) - 1)
    return tuple(nodes[(index + step) % len(nodes)].ip for step in range(1, others + 1))

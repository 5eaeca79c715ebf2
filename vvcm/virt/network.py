"""The private network of a VC, built with pyroute2 on every node that hosts one of its VMs.

On each such node: a bridge `vlxbrID` (the VMs' taps join it) and, enslaved to it, the link to
the other nodes: a VXLAN device `vlxvxID` (VNI = the VC's vxlan id, UDP 4789, unicast to every
other hosting node through all-zero FDB entries: head-end replication, no multicast needed on
the cluster network), or for a VC with a vlan id an 802.1Q device `vlxvlID` on the node's
`vlan_uplink` (real switches; the lab's kernel has no 8021q, so VLANs are only rendered there).
VMs of one VC share one layer-2 segment; another VC has another bridge and another VNI, so
nothing of it is reachable.

The bridge carries the VC's service address (`service_address`: the last host address of the
VC network, the same on every hosting node): the boot services answer DHCP and DNS there for
the VC's VMs. Each bridge is local to its node, so the shared address acts like an anycast
gateway: a VM is answered by whichever hosting node it reaches, with the same bytes. The node
does not route for VMs: IPv4 forwarding is off for packets arriving on a VC bridge (otherwise a
node that forwards, a gateway, would join the networks of the VCs it hosts). The VC's firewall
(vvcm.virt.firewall: an nftables table per VC and node) lets a VM reach only the other VMs of
its VC and the node's DHCP and DNS; `ensure()` makes it before the bridge and `remove()` takes
it away after the bridge, so a bridge never exists unfiltered.

`node_plans()` is pure (what each node should have); `ensure()` and `remove()` make a node
match it, idempotently, and say what they changed so a failed create can undo just that.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import allocate
from ..errors import VlxError
from ..model import Cluster, Node, VirtualCluster
from . import firewall
from .domain import BRIDGE_PREFIX, GUEST_MTU, bridge_name

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# pyroute2 is imported where netlink is used, not at module load: it takes ~0.5 s to import,
# which every `vlx` command would pay otherwise (the command line imports this module).

VXLAN_PORT = 4789
ZERO_MAC = "00:00:00:00:00:00"
EEXIST = 17
# Every device this module makes starts with one of these: the bridge, the VXLAN, the VLAN.
DEVICE_PREFIXES = (BRIDGE_PREFIX, "vlxvx", "vlxvl")
T = TypeVar("T")


def service_address(vc: VirtualCluster) -> ipaddress.IPv4Interface | None:
    """The VC's service address on its bridges (allocate.service_address), or None."""
    return allocate.service_address(vc.cidr)


@dataclasses.dataclass(frozen=True)
class NodePlan:
    """What one node holds for one VC."""

    node: str
    vc: str
    netns: str | None
    bridge: str
    tunnel: str
    local: str
    vxlan: int | None = None
    vlan: int | None = None
    uplink: str | None = None
    peers: tuple[str, ...] = ()
    address: str | None = None      # the VC's service address on the bridge, "IP/PREFIX"

    def firewall(self) -> firewall.VcFirewall:
        """What the node's firewall lets VMs on this bridge reach (checked values)."""
        service = ipaddress.IPv4Interface(self.address).ip if self.address else None
        return firewall.VcFirewall(vc=self.vc, bridge=self.bridge, service=service)

    def link_requests(self) -> list[dict]:
        """pyroute2 `link('add', ...)` arguments, bridge first."""
        bridge = {"ifname": self.bridge, "kind": "bridge", "br_forward_delay": 0,
                  "br_stp_state": 0}
        if self.vlan is not None:
            tunnel = {"ifname": self.tunnel, "kind": "vlan", "vlan_id": self.vlan,
                      "link_name": self.uplink}
        else:
            tunnel = {"ifname": self.tunnel, "kind": "vxlan", "vxlan_id": self.vxlan,
                      "vxlan_local": self.local, "vxlan_port": VXLAN_PORT,
                      "vxlan_learning": 1}
        return [bridge, tunnel]


def tunnel_name(vc: VirtualCluster) -> str:
    return f"vlxvl{vc.vlan}" if vc.vlan is not None else f"vlxvx{vc.vxlan}"


def hosting_nodes(cluster: Cluster, vc: str, extra: Iterable[str] = ()) -> list[str]:
    names = {vm.node for vm in cluster.vms_of(vc)} | set(extra)
    return [node.name for node in cluster.nodes if node.name in names]


def node_plans(cluster: Cluster, vc_name: str, nodes: Iterable[str]) -> list[NodePlan]:
    """One plan per node in `nodes`, each VXLAN peered with all the others."""
    vc = cluster.vc(vc_name)
    chosen = [cluster.node(name) for name in nodes]
    addresses = [str(node.ip) for node in chosen]
    uplink = cluster.settings.vlan_uplink if cluster.settings else "eth0"
    address = service_address(vc)
    service = str(address) if address is not None else None
    return [NodePlan(node=node.name, vc=vc.name, netns=node.netns, bridge=bridge_name(vc),
                     tunnel=tunnel_name(vc), local=str(node.ip), vxlan=vc.vxlan, vlan=vc.vlan,
                     uplink=uplink if vc.vlan is not None else None,
                     peers=tuple(a for a in addresses if a != str(node.ip))
                     if vc.vlan is None else (),
                     address=service)
            for node in chosen]


def open_node(plan: NodePlan) -> IPRoute:
    """Netlink to the plan's node: its lab namespace, or this host when the node's address
    is one of this host's."""
    return _open(plan.node, plan.netns, plan.local)


def _open(node: str, netns: str | None, local: str) -> IPRoute:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if netns:
        try:
            return IPRoute(netns=netns)
        except (OSError, NetlinkError) as err:
            raise VlxError(f"node {node}: network namespace {netns!r} cannot be "
                           f"opened ({err})") from None
    ipr = IPRoute()
    mine = {addr.get("IFA_ADDRESS") for addr in ipr.get_addr(family=2)}
    if local not in mine:
        ipr.close()
        raise VlxError(f"node {node} ({local}) is not this host: its VC networks "
                       "are made on it, by vlx running there (lab nodes name a netns)")
    return ipr


def plans_for_node(cluster: Cluster, node: str) -> list[NodePlan]:
    """What `node` holds: the network of every VC with a VM placed on it, each peered with
    all the VC's hosting nodes."""
    vcs = dict.fromkeys(vm.vc for vm in cluster.vms_on(node))
    return [plan for vc in vcs for plan in node_plans(cluster, vc, hosting_nodes(cluster, vc))
            if plan.node == node]


def remove_stale(node: Node, keep: Iterable[NodePlan]) -> list[str]:
    """Delete the VC devices (`vlxbr*`, `vlxvx*`, `vlxvl*`) on `node` that no plan in
    `keep` names, tunnels before bridges, then the firewall tables (`vlx_vc_*`) of VCs no plan
    names (after their bridges); returns their names."""
    keep = list(keep)
    wanted = {name for plan in keep for name in (plan.bridge, plan.tunnel)}
    gone: list[str] = []
    if node.netns is not None or not _is_local(node.ip) or any(
            name.startswith(DEVICE_PREFIXES) and name not in wanted
            for _, name in socket.if_nameindex()):
        with _open(node.name, node.netns, str(node.ip)) as ipr:
            stale = [link.get("IFLA_IFNAME") for link in ipr.get_links()
                     if link.get("IFLA_IFNAME", "").startswith(DEVICE_PREFIXES)
                     and link.get("IFLA_IFNAME") not in wanted]
            stale.sort(key=lambda name: name.startswith(BRIDGE_PREFIX))
            gone = [name for name in stale if _delete(ipr, name)]
    # else: this host's own namespace holds no VC device to remove (what a node's start-up
    # finds at every boot): seen without netlink, whose import (pyroute2) took seconds there.
    return gone + firewall.remove_stale({plan.vc for plan in keep}, node.netns, node.name)


def _is_local(address: ipaddress.IPv4Address) -> bool:
    """Whether `address` is one of this host's (binding to it works), without netlink."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def check_reachable(plans: Iterable[NodePlan]) -> None:
    """Open every node's netlink once, so an unreachable one fails before anything is made."""
    for plan in plans:
        open_node(plan).close()


def ensure(plan: NodePlan) -> list[str]:
    """Make the node match `plan`; returns the devices and firewall table it created (empty
    if all was there). The firewall is (re)defined first, every time: a bridge is never up
    without it, and a table a killed run left half-changed is replaced."""
    from pyroute2.netlink.exceptions import NetlinkError

    created: list[str] = []
    rules = plan.firewall()
    with open_node(plan) as ipr:
        if rules.table not in firewall.tables(plan.netns, plan.node):
            created.append(rules.table)
        firewall.ensure(rules, plan.netns, plan.node)
        try:
            for request in plan.link_requests():
                index = _lookup(ipr, request["ifname"])
                if index is None:
                    request = dict(request)
                    if "link_name" in request:
                        uplink = _lookup(ipr, request.pop("link_name"))
                        if uplink is None:
                            raise VlxError(f"node {plan.node}: no uplink {plan.uplink} for "
                                           f"VLAN {plan.vlan}")
                        request["link"] = uplink
                    ipr.link("add", **request)
                    created.append(request["ifname"])
                else:
                    _check_kind(ipr, index, request, plan)
            bridge = _lookup(ipr, plan.bridge)
            tunnel = _lookup(ipr, plan.tunnel)
            if bridge is None or tunnel is None:
                # Made or found just above: gone now means someone removed it meanwhile.
                raise VlxError(f"node {plan.node}: {plan.bridge} or {plan.tunnel} vanished "
                               f"while building the VC network")
            ipr.link("set", index=tunnel, master=bridge, mtu=GUEST_MTU, state="up")
            ipr.link("set", index=bridge, state="up")
            if plan.vxlan is not None:
                _sync_peers(ipr, tunnel, plan.peers)
            if plan.address is not None:
                # Forwarding off before the address makes the node reachable from the VC.
                no_forwarding(plan)
                _ensure_address(ipr, bridge, plan.address)
        except NetlinkError as err:
            for name in reversed(created):
                if name != rules.table:     # a link; the table goes below, with its bridge
                    _delete(ipr, name)
            if rules.table in created and plan.bridge in created:
                firewall.remove(plan.vc, plan.netns, plan.node)
            raise VlxError(f"node {plan.node}: cannot build the network of VC bridge "
                           f"{plan.bridge}: {err}") from None
    return created


def remove(plan: NodePlan) -> list[str]:
    """Delete the VC's devices on the node, then its firewall table; returns those that were
    there."""
    rules = plan.firewall()      # checked before anything goes
    gone = []
    with open_node(plan) as ipr:
        for name in (plan.tunnel, plan.bridge):
            if _delete(ipr, name):
                gone.append(name)
    if firewall.remove(rules.vc, plan.netns, plan.node):
        gone.append(rules.table)
    return gone


def firewall_present(plan: NodePlan) -> bool:
    """Whether the node holds the VC's firewall table."""
    return firewall.table_name(plan.vc) in firewall.tables(plan.netns, plan.node)


def devices_present(plan: NodePlan) -> list[str]:
    with open_node(plan) as ipr:
        return [name for name in (plan.bridge, plan.tunnel) if _lookup(ipr, name) is not None]


def peers_of(plan: NodePlan) -> list[str]:
    """The VXLAN peers the node's FDB names now."""
    with open_node(plan) as ipr:
        tunnel = _lookup(ipr, plan.tunnel)
        return [] if tunnel is None else sorted(_zero_entries(ipr, tunnel))


def _sync_peers(ipr: IPRoute, tunnel: int, peers: tuple[str, ...]) -> None:
    have = _zero_entries(ipr, tunnel)
    for dst in sorted(set(peers) - have):
        ipr.fdb("append", ifindex=tunnel, lladdr=ZERO_MAC, dst=dst)
    for dst in sorted(have - set(peers)):
        ipr.fdb("del", ifindex=tunnel, lladdr=ZERO_MAC, dst=dst)


def _ensure_address(ipr: IPRoute, index: int, address: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    interface = ipaddress.IPv4Interface(address)
    try:
        ipr.addr("add", index=index, address=str(interface.ip),
                 prefixlen=interface.network.prefixlen)
    except NetlinkError as err:
        if err.code != EEXIST:     # there already: a second run
            raise


def no_forwarding(plan: NodePlan) -> None:
    """Turn IPv4 forwarding off for packets arriving on the plan's bridge, in its node's
    namespace. pyroute2 0.9 cannot set IPv4 device settings over netlink: this writes the
    sysctl file instead."""
    try:
        _in_node(plan, lambda: _forwarding_file(plan).write_text("0\n"))
    except OSError as err:
        raise VlxError(f"node {plan.node}: cannot turn forwarding off on {plan.bridge}: "
                       f"{err}") from None


def forwarding(plan: NodePlan) -> bool:
    """Whether the node forwards packets arriving on the plan's bridge."""
    return _in_node(plan, lambda: _forwarding_file(plan).read_text().strip()) == "1"


def _forwarding_file(plan: NodePlan) -> Path:
    return Path("/proc/sys/net/ipv4/conf") / plan.bridge / "forwarding"


def _in_node(plan: NodePlan, work: Callable[[], T]) -> T:
    """`work()` in the plan's network namespace (/proc/sys/net shows the opener's): in a
    thread of its own, since setns moves only the calling thread, and that thread ends."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if plan.netns:
                from pyroute2 import netns
                netns.setns(plan.netns, flags=0)
            outcome.append(work())
        except BaseException as err:       # noqa: BLE001 - raised again in the caller
            failure.append(err)

    thread = threading.Thread(target=run, name=f"in {plan.netns or 'host'}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def bridge_addresses(plan: NodePlan) -> list[str]:
    """The IPv4 addresses on the plan's bridge, "IP/PREFIX"."""
    with open_node(plan) as ipr:
        index = _lookup(ipr, plan.bridge)
        if index is None:
            return []
        return sorted(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                      for a in ipr.get_addr(family=2, index=index))


def _zero_entries(ipr: IPRoute, tunnel: int) -> set[str]:
    return {entry.get("dst") for entry in ipr.fdb("dump", ifindex=tunnel)
            if entry.get("lladdr") == ZERO_MAC and entry.get("dst")}


def _check_kind(ipr: IPRoute, index: int, request: dict, plan: NodePlan) -> None:
    """A device of our name that is something else is not ours to reuse."""
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind != request["kind"]:
        raise VlxError(f"node {plan.node}: {request['ifname']} exists and is a {kind}, not a "
                       f"{request['kind']}; remove it first")
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        vni = data.get_attr("IFLA_VXLAN_ID")
        local = data.get_attr("IFLA_VXLAN_LOCAL")
        if vni != plan.vxlan or (local and ipaddress.ip_address(local) !=
                                 ipaddress.ip_address(plan.local)):
            raise VlxError(f"node {plan.node}: {plan.tunnel} exists with VNI {vni} local "
                           f"{local}, not {plan.vxlan} local {plan.local}; remove it first")


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _delete(ipr: IPRoute, name: str) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    index = _lookup(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as err:
        if err.code != 19:  # ENODEV: gone meanwhile
            raise
    return True

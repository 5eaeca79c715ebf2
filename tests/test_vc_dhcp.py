"""DHCP for VMs on their VC's bridge, without sockets: each VC network is answered on its own
bridge only, from the VC's service address, with the VC's domain as search list; a VM asking
on another VC's bridge or on the cluster network, and a node asking on a VC bridge, get
nothing and are counted."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.dhcp_networks import served_networks
from virtualinux.bootsvc.dhcp_responder import OPT_DOMAIN_SEARCH, Responder, domain_search
from virtualinux.bootsvc.service import Replica
from virtualinux.bootsvc.vc_links import served_here, vc_interfaces
from virtualinux.vvcm import changes, inventory
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import VirtualCluster
from virtualinux.vvcm.virt.domain import kernel_cmdline
from virtualinux.vvcm.virt.network import service_address

from .conftest import EXAMPLE
from .test_dhcp_wire import scapy_request

NODE1 = bytes.fromhex("525400000011")
GREEN_BRIDGE, TAN_BRIDGE = "vlxbr103", "vlxbr104"
GREEN_SERVER = ipaddress.IPv4Address("198.19.3.254")


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


def responder(cluster) -> Responder:
    replica = Replica(node=cluster.node("node1"), interface="eth0",
                      address=ipaddress.IPv4Address("198.18.0.11"),
                      netboot_root=Path("/nb"), state_dir=Path("/st"), services=("dhcp",))
    return Responder(cluster, replica, Counter())


def mac_of(cluster, vm: str) -> bytes:
    return wire.parse_mac(next(v.mac for v in cluster.vms if v.name == vm))


def ask(r: Responder, interface: str | None, *args, **kwargs):
    reply = r.respond(scapy_request(*args, **kwargs), interface)
    return reply, (wire.decode(reply.data) if reply else None)


def test_service_address_is_the_last_host_and_none_without_room():
    vc = VirtualCluster(name="a", vms=2, vcpus=1, memory=64,
                        cidr=ipaddress.IPv4Network("198.19.6.0/24"))
    assert service_address(vc) == ipaddress.IPv4Interface("198.19.6.254/24")
    small = VirtualCluster(name="b", vms=1, vcpus=1, memory=64,
                           cidr=ipaddress.IPv4Network("198.19.6.0/31"))
    assert service_address(small) is None


def test_every_vc_is_a_network_on_its_own_bridge(cluster):
    networks = {net.name: net for net in served_networks(cluster)}
    assert list(networks) == ["cluster", "vc green", "vc tan", "vc pink"]
    green = networks["vc green"]
    assert (green.interface, green.server, green.router) == (GREEN_BRIDGE, GREEN_SERVER, None)
    assert green.domain == "green.cluster.lab" and green.ntp == ()
    assert sorted(host.name for host in green.hosts.values()) == [
        "green-1", "green-2", "green-3", "green-4"]
    assert networks["cluster"].interface is None
    assert sorted(vc_interfaces(cluster)) == ["vlxbr103", "vlxbr104", "vlxbr105"]


def test_vm_gets_address_dns_and_search_domain_on_its_bridge_and_the_ack(cluster):
    r = responder(cluster)
    mac = mac_of(cluster, "green-2")
    reply, offer = ask(r, GREEN_BRIDGE, "discover", mac, xid=9)
    assert reply.address == "255.255.255.255" and offer.message_type == wire.OFFER
    assert offer.yiaddr == ipaddress.IPv4Address("198.19.3.2")
    assert offer.option(wire.OPT_SERVER_ID) == GREEN_SERVER.packed
    assert offer.option(wire.OPT_DNS) == GREEN_SERVER.packed
    assert offer.option(wire.OPT_SUBNET_MASK) == ipaddress.IPv4Address("255.255.255.0").packed
    assert offer.option(wire.OPT_DOMAIN_NAME) == b"green.cluster.lab"
    assert offer.option(OPT_DOMAIN_SEARCH) == b"\x05green\x07cluster\x03lab\x00"
    assert offer.option(wire.OPT_HOST_NAME) == b"green-2"
    # A VC is private: no router, no NTP.
    assert offer.option(wire.OPT_ROUTER) is None and offer.option(wire.OPT_NTP) is None
    reply, ack = ask(r, GREEN_BRIDGE, "request", mac, extra=[
        ("server_id", str(GREEN_SERVER)), ("requested_addr", "198.19.3.2")])
    assert ack.message_type == wire.ACK and ack.yiaddr == ipaddress.IPv4Address("198.19.3.2")
    # A REQUEST naming the cluster replica is for another server on this bridge.
    assert ask(r, GREEN_BRIDGE, "request", mac, extra=[
        ("server_id", "198.18.0.11"), ("requested_addr", "198.19.3.2")])[0] is None
    assert r.counters["ignored_other_server"] == 1


def test_wrong_bridge_cluster_network_and_nodes_get_nothing_and_are_counted(cluster):
    r = responder(cluster)
    green = mac_of(cluster, "green-1")
    assert ask(r, TAN_BRIDGE, "discover", green)[0] is None        # another VC's bridge
    assert ask(r, None, "discover", green)[0] is None              # the cluster network
    assert ask(r, GREEN_BRIDGE, "discover", NODE1)[0] is None      # a node on a VC bridge
    assert r.counters["ignored_wrong_network"] == 3
    assert ask(r, GREEN_BRIDGE, "discover", bytes.fromhex("0200000000aa"))[0] is None
    assert r.counters["ignored_unknown_mac"] == 1
    assert ask(r, "vlxbr999", "discover", green)[0] is None        # no VC has that bridge
    assert r.counters["ignored_no_network"] == 1
    # Relays serve the cluster network; a relayed request on a VC bridge is not ours.
    assert ask(r, GREEN_BRIDGE, "discover", green, giaddr="198.19.3.1")[0] is None
    assert r.counters["ignored_relayed_on_vc_network"] == 1
    # The node is still served where it belongs.
    assert ask(r, None, "discover", NODE1)[1].yiaddr == ipaddress.IPv4Address("198.18.0.11")


def test_two_hosting_nodes_answer_a_vm_byte_for_byte(cluster):
    data = scapy_request("discover", mac_of(cluster, "tan-1"), xid=5)
    one = responder(cluster).respond(data, TAN_BRIDGE)
    other = Responder(cluster, Replica(node=cluster.node("node2"), interface="eth0",
                                       address=ipaddress.IPv4Address("198.18.0.12"),
                                       netboot_root=Path("/nb"), state_dir=Path("/st")),
                      Counter()).respond(data, TAN_BRIDGE)
    assert one is not None and one == other


def test_no_vm_takes_the_service_address_and_a_full_network_is_refused(cluster):
    fits = changes.define_vc(cluster, VirtualCluster(
        name="lime", vms=5, vcpus=1, memory=64, cidr=ipaddress.IPv4Network("198.19.9.0/29")))
    assert [str(vm.ip) for vm in fits.vms_of("lime")] == [f"198.19.9.{i}" for i in range(1, 6)]
    assert "vc lime" in {net.name for net in served_networks(fits)}
    with pytest.raises(VlxError, match="6 VMs do not fit in 198.19.9.0/29"):
        changes.define_vc(cluster, VirtualCluster(
            name="full", vms=6, vcpus=1, memory=64, cidr=ipaddress.IPv4Network("198.19.9.0/29")))


def test_a_network_with_no_room_for_a_service_address_gets_static_addresses(cluster):
    tiny = changes.define_vc(cluster, VirtualCluster(
        name="pair", vms=2, vcpus=1, memory=64, cidr=ipaddress.IPv4Network("198.19.9.0/31"),
        kernel="/boot/vmlinuz"))
    assert "vc pair" not in {net.name for net in served_networks(tiny)}
    vm = tiny.vms_of("pair")[0]
    assert kernel_cmdline(tiny.vc("pair"), vm, "qemu") == (
        f"console=ttyS0 ip={vm.ip}:::255.255.255.254:pair-1:eth0:off")


def test_served_here_needs_the_bridge_and_its_service_address(cluster):
    interfaces = vc_interfaces(cluster)
    assert served_here(interfaces, {}) == []
    assert served_here(interfaces, {GREEN_BRIDGE: frozenset()}) == []
    assert [s.vc for s in served_here(interfaces, {
        GREEN_BRIDGE: frozenset({GREEN_SERVER}),
        TAN_BRIDGE: frozenset({ipaddress.IPv4Address("198.19.4.1")})})] == ["green"]


def test_domain_search_is_rfc_3397_wire_form():
    assert domain_search("a.b", "c") == b"\x01a\x01b\x00\x01c\x00"

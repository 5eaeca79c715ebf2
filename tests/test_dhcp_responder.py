"""The DHCP responder without sockets: what each kind of client message gets, PXE and iPXE
boot files, relays, and replicas that agree byte for byte."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.dhcp import DhcpService
from virtualinux.bootsvc.dhcp_networks import served_networks
from virtualinux.bootsvc.dhcp_responder import OPT_DOMAIN_SEARCH, Responder, domain_search
from virtualinux.bootsvc.service import Replica
from virtualinux.netboot import layout
from virtualinux.vvcm import Node, changes, inventory

from .conftest import EXAMPLE
from .test_dhcp_wire import scapy_request

NODE1 = bytes.fromhex("525400000011")
UNKNOWN = bytes.fromhex("525400000099")
A = ipaddress.IPv4Address("198.18.0.201")
B = ipaddress.IPv4Address("198.18.0.202")


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


def replica(address=A, services=("dhcp",)) -> Replica:
    return Replica(node=None, interface="eth0", address=address, netboot_root=Path("/nb"),
                   state_dir=Path("/st"), services=services)


def responder(cluster, address=A, services=("dhcp",)) -> Responder:
    return Responder(cluster, replica(address, services), Counter())


def answer(responder: Responder, *args, **kwargs):
    reply = responder.respond(scapy_request(*args, **kwargs))
    return reply, (wire.decode(reply.data) if reply else None)


def test_discover_from_a_node_gets_an_offer_with_everything_it_needs(cluster):
    reply, offer = answer(responder(cluster), "discover", NODE1, xid=77, flags=0x8000)
    assert (reply.address, reply.port) == ("255.255.255.255", 68)
    assert len(reply.data) >= wire.MIN_REPLY_LEN
    assert offer.op == wire.BOOTREPLY and offer.xid == 77 and offer.flags == 0x8000
    assert offer.message_type == wire.OFFER and offer.chaddr == NODE1
    assert offer.yiaddr == ipaddress.IPv4Address("198.18.0.11")
    assert offer.option(wire.OPT_SERVER_ID) == A.packed
    assert offer.option(wire.OPT_SUBNET_MASK) == ipaddress.IPv4Address("255.255.255.0").packed
    assert offer.option(wire.OPT_ROUTER) == ipaddress.IPv4Address("198.18.0.254").packed
    assert offer.option(wire.OPT_DNS) == wire.addresses(
        ["198.18.0.12", "198.18.0.13", "198.18.0.14"])   # every other node
    assert offer.option(wire.OPT_DOMAIN_NAME) == b"cluster.lab"
    assert offer.option(wire.OPT_HOST_NAME) == b"node1"
    assert offer.option(wire.OPT_NTP) == ipaddress.IPv4Address("198.18.1.123").packed
    assert offer.option(wire.OPT_LEASE_TIME) == wire.u32(3600)
    assert offer.option(wire.OPT_RENEWAL_TIME) == wire.u32(1800)
    assert offer.option(wire.OPT_REBINDING_TIME) == wire.u32(3150)
    assert offer.option(wire.OPT_BOOTFILE) is None and offer.file == b""
    assert offer.options[0] == (wire.OPT_MESSAGE_TYPE, bytes([wire.OFFER]))


def test_dns_servers_are_three_other_nodes_spread_over_the_cluster():
    nodes = tuple(Node(name=f"n{i}", mac=f"52:54:00:00:01:{i:02x}",
                       ip=ipaddress.IPv4Address("198.18.0.100") + i, cpus=1, memory=512)
                  for i in range(6))
    cluster = changes.validated(dataclasses.replace(
        _bare_cluster(), nodes=nodes))
    hosts = list(served_networks(cluster)[0].hosts.values())
    assert [str(ip) for ip in hosts[0].dns] == ["198.18.0.101", "198.18.0.102", "198.18.0.103"]
    assert [str(ip) for ip in hosts[5].dns] == ["198.18.0.100", "198.18.0.101", "198.18.0.102"]
    assert all(host.ip not in host.dns for host in hosts)


def _bare_cluster():
    from virtualinux.vvcm.model import Cluster, Settings
    return Cluster(generation=1, settings=Settings(
        domain="cluster.lab", cidr=ipaddress.IPv4Network("198.18.0.0/24"),
        gateway_vip=ipaddress.IPv4Address("198.18.0.254")))


def test_request_in_selecting_state_gets_an_ack(cluster):
    r = responder(cluster)
    reply, ack = answer(r, "request", NODE1, xid=5, extra=[
        ("server_id", str(A)), ("requested_addr", "198.18.0.11")])
    assert ack.message_type == wire.ACK and ack.xid == 5
    assert ack.yiaddr == ipaddress.IPv4Address("198.18.0.11")
    assert reply.address == "255.255.255.255"
    assert r.counters["DHCPACK"] == 1


def test_selecting_request_without_the_address_is_counted_not_answered(cluster):
    """RFC 2131 4.3.2: a REQUEST naming this server must name the address too."""
    service = DhcpService(replica(), cluster)
    data = scapy_request("request", NODE1, extra=[("server_id", str(A))])
    assert service.handle(data, ("0.0.0.0", 68)) is None
    assert service.counters["ignored_request_without_address"] == 1


def test_request_naming_another_server_is_left_to_it(cluster):
    r = responder(cluster)
    reply, _ = answer(r, "request", NODE1, extra=[
        ("server_id", str(B)), ("requested_addr", "198.18.0.11")])
    assert reply is None and r.counters["ignored_other_server"] == 1


def test_request_for_a_wrong_address_gets_a_broadcast_nak(cluster):
    for extra in ([("server_id", str(A)), ("requested_addr", "198.18.0.99")],   # SELECTING
                  [("requested_addr", "198.18.0.99")]):                         # INIT-REBOOT
        reply, nak = answer(responder(cluster), "request", NODE1, xid=9, extra=extra)
        assert nak.message_type == wire.NAK and nak.xid == 9
        assert nak.yiaddr == ipaddress.IPv4Address(0)
        assert nak.option(wire.OPT_SERVER_ID) == A.packed
        assert nak.option(wire.OPT_LEASE_TIME) is None
        assert reply.address == "255.255.255.255"


def test_init_reboot_with_the_right_address_gets_an_ack(cluster):
    reply, ack = answer(responder(cluster), "request", NODE1,
                        extra=[("requested_addr", "198.18.0.11")])
    assert ack.message_type == wire.ACK and reply.address == "255.255.255.255"


def test_renewing_client_gets_its_ack_unicast_with_ciaddr_echoed(cluster):
    reply, ack = answer(responder(cluster), "request", NODE1, ciaddr="198.18.0.11")
    assert (reply.address, reply.port) == ("198.18.0.11", 68)
    assert ack.message_type == wire.ACK
    assert ack.ciaddr == ack.yiaddr == ipaddress.IPv4Address("198.18.0.11")


def test_rebinding_with_a_replica_that_never_saw_the_client_keeps_its_address(cluster):
    # The other replica answers from the database alone: same address, no lease state needed.
    reply, ack = answer(responder(cluster, B), "request", NODE1, ciaddr="198.18.0.11",
                        flags=0x8000)
    assert ack.message_type == wire.ACK and ack.yiaddr == ipaddress.IPv4Address("198.18.0.11")
    assert ack.option(wire.OPT_SERVER_ID) == B.packed


def test_renewing_with_another_address_gets_a_nak(cluster):
    reply, nak = answer(responder(cluster), "request", NODE1, ciaddr="198.18.0.77")
    assert nak.message_type == wire.NAK and reply.address == "255.255.255.255"


def test_inform_gets_an_ack_without_lease_or_address(cluster):
    reply, ack = answer(responder(cluster), "inform", NODE1, ciaddr="198.18.0.11")
    assert ack.message_type == wire.ACK and ack.yiaddr == ipaddress.IPv4Address(0)
    assert ack.ciaddr == ipaddress.IPv4Address("198.18.0.11")
    assert ack.option(wire.OPT_LEASE_TIME) is None and ack.option(wire.OPT_RENEWAL_TIME) is None
    assert ack.option(wire.OPT_ROUTER) is not None
    assert (reply.address, reply.port) == ("198.18.0.11", 68)


def test_release_and_decline_are_counted_and_not_answered(cluster):
    r = responder(cluster)
    assert answer(r, "release", NODE1, ciaddr="198.18.0.11")[0] is None
    assert answer(r, "decline", NODE1, extra=[("requested_addr", "198.18.0.11")])[0] is None
    assert r.counters["DHCPRELEASE"] == 1 and r.counters["DHCPDECLINE"] == 1


def test_unknown_mac_gets_no_answer_and_is_counted(cluster):
    r = responder(cluster)
    assert answer(r, "discover", UNKNOWN)[0] is None
    assert answer(r, "request", UNKNOWN, extra=[("requested_addr", "198.18.0.11")])[0] is None
    assert r.counters["ignored_unknown_mac"] == 2


def test_vms_are_not_served_on_the_cluster_network(cluster):
    vm = cluster.vms[0]
    r = responder(cluster)
    assert answer(r, "discover", wire.parse_mac(vm.mac))[0] is None
    assert r.counters == {"DHCPDISCOVER": 1, "ignored_wrong_network": 1}


def test_empty_database_answers_nobody(db):
    r = responder(db.load())
    assert answer(r, "discover", NODE1)[0] is None
    assert r.counters["ignored_no_network"] == 1


def test_relayed_discover_goes_back_to_the_relay_with_option_82_echoed(cluster):
    relay_info = b"\x01\x06port-7\x02\x04rack"
    reply, offer = answer(responder(cluster), "discover", NODE1, giaddr="198.18.0.1",
                          extra=[("relay_agent_information", relay_info)])
    assert (reply.address, reply.port) == ("198.18.0.1", 67)
    assert offer.giaddr == ipaddress.IPv4Address("198.18.0.1")
    assert offer.option(wire.OPT_RELAY_AGENT) == relay_info
    # RFC 3046: the relay agent information is the last option before the end.
    end = reply.data.index(bytes([wire.OPT_RELAY_AGENT, len(relay_info)]) + relay_info)
    assert reply.data[end + 2 + len(relay_info)] == wire.OPT_END


def test_relayed_nak_asks_the_relay_to_broadcast(cluster):
    reply, nak = answer(responder(cluster), "request", NODE1, giaddr="198.18.0.1",
                        extra=[("requested_addr", "198.18.0.99"),
                               ("relay_agent_information", b"\x01\x01x")])
    assert nak.message_type == wire.NAK and nak.flags & wire.BROADCAST_FLAG
    assert nak.option(wire.OPT_RELAY_AGENT) == b"\x01\x01x"
    assert (reply.address, reply.port) == ("198.18.0.1", 67)


def test_relay_from_a_network_we_do_not_serve_is_ignored(cluster):
    r = responder(cluster)
    assert answer(r, "discover", NODE1, giaddr="198.18.7.1")[0] is None
    assert r.counters["ignored_no_network"] == 1


@pytest.mark.parametrize(("arch", "bootfile"), sorted(layout.ARCH_BOOTFILES.items()))
def test_pxe_client_architecture_picks_the_ipxe_binary(cluster, arch, bootfile):
    _, offer = answer(responder(cluster), "discover", NODE1,
                      extra=[("pxe_client_architecture", arch.to_bytes(2, "big"))])
    assert offer.file == bootfile.encode() and offer.option(wire.OPT_BOOTFILE) == offer.file
    assert offer.siaddr == A and offer.option(wire.OPT_TFTP_SERVER) == str(A).encode()


def test_bios_and_uefi_get_different_binaries(cluster):
    r = responder(cluster)
    _, bios = answer(r, "discover", NODE1, extra=[("pxe_client_architecture", b"\x00\x00")])
    _, uefi = answer(r, "discover", NODE1, extra=[("pxe_client_architecture", b"\x00\x07")])
    assert bios.file == b"undionly.kpxe" and uefi.file == b"snponly.efi"


def test_unknown_architecture_gets_an_address_but_no_boot_file(cluster):
    r = responder(cluster)
    _, offer = answer(r, "discover", NODE1, extra=[("pxe_client_architecture", b"\x00\x42")])
    assert offer.yiaddr == ipaddress.IPv4Address("198.18.0.11") and offer.file == b""
    assert r.counters["unknown_client_arch"] == 1


@pytest.mark.parametrize(("services", "url"), [
    (("dhcp", "tftp", "http"), "http://198.18.0.201/boot.ipxe"),
    (("dhcp", "tftp"), "tftp://198.18.0.201/boot.ipxe"),
])
@pytest.mark.parametrize("ipxe_sign", [
    (wire.OPT_IPXE_ENCAP, b"\x13\x01\x01"), (wire.OPT_USER_CLASS, b"iPXE")])
def test_ipxe_client_gets_the_script_url_not_ipxe_again(cluster, services, url, ipxe_sign):
    _, offer = answer(responder(cluster, services=services), "discover", NODE1, extra=[
        ("pxe_client_architecture", b"\x00\x00"), ipxe_sign])
    assert offer.file == url.encode() and offer.option(wire.OPT_BOOTFILE) == url.encode()


def _same_apart_from_replica(data_a: bytes, data_b: bytes) -> bool:
    """Replica B's answer, with every field naming B changed to name A, equals A's."""
    return data_b.replace(B.packed, A.packed).replace(str(B).encode(), str(A).encode()) == data_a


@pytest.mark.parametrize("extra", [
    [], [("pxe_client_architecture", b"\x00\x07")],
    [("pxe_client_architecture", b"\x00\x00"), (wire.OPT_USER_CLASS, b"iPXE")],
    [("relay_agent_information", b"\x01\x02ab")],
])
def test_two_replicas_answer_byte_for_byte_alike(cluster, extra):
    ra = responder(cluster, A, ("dhcp", "http"))
    rb = responder(cluster, B, ("dhcp", "http"))
    for kind, more in (("discover", []), ("request", [("requested_addr", "198.18.0.11")])):
        data = scapy_request(kind, NODE1, xid=0xABCD, extra=more + extra)
        a, b = ra.respond(data), rb.respond(data)
        assert a.data != b.data and _same_apart_from_replica(a.data, b.data)
        assert a.address == b.address


def test_cached_answer_carries_each_request_s_own_fields(cluster):
    r = responder(cluster)
    _, first = answer(r, "request", NODE1, xid=1, ciaddr="198.18.0.11")
    _, second = answer(r, "request", NODE1, xid=2, flags=0x8000,
                       extra=[("requested_addr", "198.18.0.11")])
    assert second.xid == 2 and second.flags == 0x8000
    assert second.ciaddr == ipaddress.IPv4Address(0)


def test_new_generation_serves_a_new_node(db, cluster):
    service = DhcpService(replica(), cluster)
    mac = "52:54:00:00:00:15"
    assert service.responder.respond(scapy_request("discover", wire.parse_mac(mac))) is None
    newer = db.update("node add", "node5", lambda c: changes.add_node(c, Node(
        name="node5", mac=mac, ip=ipaddress.IPv4Address("198.18.0.15"), cpus=2, memory=1024)))
    service.reload(newer)
    reply = service.responder.respond(scapy_request("discover", wire.parse_mac(mac)))
    assert wire.decode(reply.data).yiaddr == ipaddress.IPv4Address("198.18.0.15")
    assert service.counters["ignored_unknown_mac"] == 1 and service.counters["DHCPOFFER"] == 1


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_datagrams_are_dropped_and_counted_never_raised(cluster, data):
    service = DhcpService(replica(), cluster)
    service.handle(data, ("198.18.0.77", 68))
    # Each datagram is accounted for: dropped and counted once by its reason, or else read
    # and counted by its message type (and by the answer's, if it got one).
    kinds = set(wire.MESSAGE_TYPE_NAMES.values())
    dropped = sum(v for k, v in service.counters.items() if k.startswith("dropped_"))
    read = sum(v for k, v in service.counters.items() if k in kinds)
    assert (dropped == 1 and read == 0) or (dropped == 0 and read >= 1), service.counters


def test_service_loop_counts_each_kind_of_garbage_and_still_serves(cluster):
    service = DhcpService(replica(), cluster)
    valid = scapy_request("discover", NODE1)
    garbage = [valid[:100], valid[:236] + b"\0\0\0\0" + valid[240:],
               scapy_request(op=2), valid[:240] + bytes([53, 1, 1, 12, 200])]
    assert [service.handle(data, ("198.18.0.77", 68)) for data in garbage] == [None] * 4
    reply = service.handle(valid, ("0.0.0.0", 68))
    assert service.counters["dropped_short"] == 1 and service.counters["dropped_bad_cookie"] == 1
    assert service.counters["dropped_bad_opcode"] == 1
    assert service.counters["dropped_option_overrun"] == 1
    assert wire.decode(reply.data).message_type == wire.OFFER


@pytest.fixture
def pooled(db, cluster):
    pool = (ipaddress.IPv4Address("198.18.0.100"), ipaddress.IPv4Address("198.18.0.149"))
    return db.update("settings", "pool", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, discovery_pool=pool)))


def test_unknown_mac_gets_a_pool_address_and_is_remembered_when_a_pool_is_set(pooled):
    r = responder(pooled)
    reply, offer = answer(r, "discover", UNKNOWN)
    assert offer.message_type == wire.OFFER
    address = offer.yiaddr
    assert ipaddress.IPv4Address("198.18.0.100") <= address <= ipaddress.IPv4Address(
        "198.18.0.149")
    assert offer.option(wire.OPT_HOST_NAME) == b"new-525400000099"
    _, ack = answer(r, "request", UNKNOWN, extra=[("requested_addr", str(address)),
                                                  ("server_id", str(A))])
    assert ack.message_type == wire.ACK and ack.yiaddr == address
    assert r.discovered == {"52:54:00:00:00:99": str(address)}
    assert r.counters["discovery_pool_answers"] == 2
    assert r.counters["ignored_unknown_mac"] == 0


def test_every_replica_offers_an_unknown_mac_the_same_pool_address(pooled):
    offers = {answer(responder(pooled, address), "discover", UNKNOWN)[1].yiaddr
              for address in (A, B)}
    assert len(offers) == 1
    other = answer(responder(pooled), "discover", bytes.fromhex("525400000098"))[1].yiaddr
    assert other in pooled.settings.cidr   # another MAC: its own hash, same pool


def test_a_flood_of_made_up_macs_does_not_grow_the_kept_answers(pooled):
    r = responder(pooled)
    known = sum(len(network.hosts) for network in r.networks)
    assert known and r.encoded_hosts == known     # every known host's, before any request
    for i in range(200):
        answer(r, "discover", bytes([0x02, 0, 0, 0, i >> 8, i & 0xFF]))
    assert len(r.discovered) == 200 and r.counters["DHCPOFFER"] == 200
    assert r.encoded_hosts == known


def test_a_known_node_never_gets_a_pool_address(pooled):
    assert answer(responder(pooled), "discover", NODE1)[1].yiaddr == ipaddress.IPv4Address(
        "198.18.0.11")


def _encoded_whole(r: Responder, network, host, kind: int, bootfile) -> bytes:
    """The straightforward encoding of one host's answer, option by option, to hold the
    responder's spliced templates against."""
    options = [(wire.OPT_MESSAGE_TYPE, bytes([wire.ACK if kind == wire.INFORM else kind])),
               (wire.OPT_SERVER_ID, (network.server or r._replica_address).packed)]
    if kind != wire.INFORM:
        options += [(wire.OPT_LEASE_TIME, wire.u32(network.lease_time)),
                    (wire.OPT_RENEWAL_TIME, wire.u32(network.lease_time // 2)),
                    (wire.OPT_REBINDING_TIME, wire.u32(network.lease_time * 7 // 8))]
    options += [(wire.OPT_SUBNET_MASK, network.cidr.netmask.packed),
                (wire.OPT_BROADCAST, network.cidr.broadcast_address.packed)]
    if network.router is not None:
        options.append((wire.OPT_ROUTER, network.router.packed))
    if host.dns:
        options.append((wire.OPT_DNS, b"".join(ip.packed for ip in host.dns)))
    options += [(wire.OPT_DOMAIN_NAME, network.domain.encode()),
                (wire.OPT_HOST_NAME, host.name.encode())]
    if network.interface is not None:
        options.append((OPT_DOMAIN_SEARCH, domain_search(network.domain)))
    if network.ntp:
        options.append((wire.OPT_NTP, b"".join(ip.packed for ip in network.ntp)))
    if bootfile is not None:
        options += [(wire.OPT_TFTP_SERVER, str(r._replica_address).encode()),
                    (wire.OPT_BOOTFILE, bootfile.encode())]
    return wire.encode(wire.Message(
        op=wire.BOOTREPLY, xid=0, chaddr=host.mac, options=tuple(options),
        yiaddr=host.ip if kind != wire.INFORM else ipaddress.IPv4Address(0),
        siaddr=r._replica_address if bootfile else ipaddress.IPv4Address(0),
        file=bootfile.encode() if bootfile else b""))


def _joined(r: Responder, network, host, kind: int, bootfile) -> bytes:
    """The responder's answer for a request with all its own fields zero."""
    return r._join(r._shared_parts(network, kind, bootfile), r._encode_host(network, host), kind,
                   xid=bytes(4), flags=bytes(2), ciaddr=bytes(4), giaddr=bytes(4),
                   chaddr=host.mac.ljust(16, b"\0"), relay_agent=None)


def test_spliced_answers_are_byte_for_byte_the_whole_encoding(cluster):
    r = responder(cluster, services=("dhcp", "http"))
    checked = 0
    for network in r.networks:       # the cluster network and every VC network
        for host in network.hosts.values():
            for kind in (wire.OFFER, wire.ACK, wire.INFORM):
                for bootfile in (None, "undionly.kpxe", r.ipxe_url):
                    assert (_joined(r, network, host, kind, bootfile)
                            == _encoded_whole(r, network, host, kind, bootfile))
                    checked += 1
    assert checked >= 9 * len(cluster.nodes)


@pytest.mark.parametrize("name_length", [1, 30, 63])
@pytest.mark.parametrize("domain_length", [5, 100, 253])
def test_answers_longer_than_the_minimum_are_not_padded_and_shorter_ones_are(
        cluster, name_length, domain_length):
    r = responder(cluster, services=("dhcp", "http"))
    network = dataclasses.replace(r.local, domain=("d" * 63 + ".") * (domain_length // 64)
                                  + "e" * (domain_length % 64 or 1))
    host = dataclasses.replace(next(iter(network.hosts.values())), name="h" * name_length)
    for kind in (wire.OFFER, wire.ACK, wire.INFORM):
        for bootfile in (None, r.ipxe_url):
            whole = _encoded_whole(r, network, host, kind, bootfile)
            assert _joined(r, network, host, kind, bootfile) == whole
            assert len(whole) >= wire.MIN_REPLY_LEN

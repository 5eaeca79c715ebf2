"""DHCP load balancing without sockets: which replicas a client's hash picks, how evenly, what
moves when a replica leaves, and when every replica answers anyway."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from virtualinux.bootsvc import balance
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.dhcp import DhcpService
from virtualinux.bootsvc.dhcp_responder import Responder
from virtualinux.bootsvc.service import Replica
from virtualinux.vvcm import Node, VlxError, changes, inventory

from .conftest import EXAMPLE
from .test_dhcp_wire import scapy_request

NODE1 = bytes.fromhex("525400000011")
SIX = tuple(f"node{i}" for i in range(1, 7))


def macs(count: int) -> list[bytes]:
    return [bytes.fromhex("5254") + i.to_bytes(4, "big") for i in range(count)]


@pytest.fixture
def cluster(db):
    """The example cluster with six nodes, node1..node6."""
    def six_nodes(c):
        c = inventory.apply(c, inventory.load(EXAMPLE), "test")
        for i in (5, 6):
            c = changes.add_node(c, Node(name=f"node{i}", mac=f"52:54:00:00:00:1{i}",
                                         ip=ipaddress.IPv4Address(f"198.18.0.1{i}"), cpus=2,
                                         memory=1024))
        return c
    return db.update("db import", "test", six_nodes)


def node_replica(cluster, name: str | None) -> Replica:
    node = cluster.node(name) if name else None
    address = node.ip if node else ipaddress.IPv4Address("198.18.0.201")
    return Replica(node=node, interface="eth0", address=address, netboot_root=Path("/nb"),
                   state_dir=Path("/st"), services=("dhcp",))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def responders(cluster, clock=None) -> dict[str, Responder]:
    return {name: Responder(cluster, node_replica(cluster, name), Counter(), log_events=False,
                            transactions=balance.Transactions(clock=clock or Clock()))
            for name in SIX}


def answered_by(responders: dict[str, Responder], packet: bytes) -> dict[str, wire.Message]:
    replies = {name: r.respond(packet) for name, r in responders.items()}
    return {name: wire.decode(reply.data) for name, reply in replies.items() if reply}


def test_each_of_six_replicas_is_chosen_for_about_k_sixths_of_1000_macs():
    k = 2
    balancers = [balance.Balancer(SIX, me, k, 3, known=macs(1000)) for me in SIX]
    chosen = Counter()
    for mac in macs(1000):
        mine = [b.me for b in balancers if b.chosen(mac)]
        assert len(mine) == k, mac.hex()
        assert tuple(sorted(mine)) == tuple(sorted(balance.choose(mac, SIX, k)))
        chosen.update(mine)
    expected = 1000 * k / 6
    assert all(abs(count - expected) <= 0.2 * expected for count in chosen.values()), chosen


def test_a_replica_leaving_moves_only_its_own_share():
    five = tuple(name for name in SIX if name != "node4")
    moved = 0
    for mac in macs(1000):
        before, after = set(balance.choose(mac, SIX, 2)), set(balance.choose(mac, five, 2))
        if "node4" in before:
            assert before - {"node4"} <= after and len(after - before) == 1
            moved += 1
        else:
            assert before == after
    assert 250 <= moved <= 420   # node4's share: about 2/6 of the clients


def test_two_independently_built_replicas_agree_on_the_chosen_k(cluster, db):
    again = db.load()   # a second copy of the same generation, as another node reads it
    assert again is not cluster and again.generation == cluster.generation
    for name in SIX:
        first = balance.for_replica(cluster, name, macs(300))
        second = balance.for_replica(again, name, ())   # computed lazily instead
        assert [first.chosen(m) for m in macs(300)] == [second.chosen(m) for m in macs(300)]


def test_a_discover_with_secs_0_gets_exactly_k_offers_for_the_same_address(cluster):
    offers = answered_by(responders(cluster), scapy_request("discover", NODE1))
    assert sorted(offers) == sorted(balance.choose(NODE1, SIX, 2))
    assert {offer.yiaddr for offer in offers.values()} == {ipaddress.IPv4Address("198.18.0.11")}


def test_a_client_trying_past_the_threshold_is_answered_by_every_replica(cluster):
    everyone = responders(cluster)
    packet = bytearray(scapy_request("discover", NODE1))
    packet[8:10] = (3).to_bytes(2, "big")   # secs
    assert sorted(answered_by(everyone, bytes(packet))) == sorted(SIX)
    left = [r.counters for name, r in everyone.items() if name not in balance.choose(
        NODE1, SIX, 2)]
    assert all(c["answered_fallback"] == 1 and c["left_to_others"] == 0 for c in left)


def test_a_transaction_repeated_after_a_delay_is_answered_by_every_replica(cluster):
    clock = Clock()
    everyone = responders(cluster, clock)
    packet = scapy_request("discover", NODE1, xid=99)
    assert len(answered_by(everyone, packet)) == 2
    clock.now += balance.REPEAT_DELAY / 2     # a duplicate of the same packet: still two
    assert len(answered_by(everyone, packet)) == 2
    clock.now += balance.REPEAT_DELAY         # the client's retransmission: all six
    assert len(answered_by(everyone, packet)) == 6
    assert len(answered_by(everyone, scapy_request("discover", NODE1, xid=100))) == 2
    counts = Counter()
    for r in everyone.values():
        counts.update(r.counters)
    assert counts["answered_chosen"] == 2 * 4 and counts["left_to_others"] == 4 * 3
    assert counts["answered_fallback"] == counts["fallback_repeated_transaction"] == 4


def test_requests_naming_a_server_renewals_and_relays_are_answered_as_before(cluster):
    everyone = responders(cluster)
    named = "node6" if "node6" not in balance.choose(NODE1, SIX, 2) else "node5"
    selecting = scapy_request("request", NODE1, extra=[
        ("server_id", str(cluster.node(named).ip)), ("requested_addr", "198.18.0.11")])
    assert list(answered_by(everyone, selecting)) == [named]
    renewing = scapy_request("request", NODE1, ciaddr="198.18.0.11")
    assert len(answered_by(everyone, renewing)) == 6
    relayed = scapy_request("discover", NODE1, giaddr="198.18.0.254")
    assert len(answered_by(everyone, relayed)) == 6
    init_reboot = scapy_request("request", NODE1, extra=[("requested_addr", "198.18.0.11")])
    assert sorted(answered_by(everyone, init_reboot)) == sorted(balance.choose(NODE1, SIX, 2))


def test_client_identifier_is_hashed_unless_it_is_the_mac():
    assert balance.client_key(NODE1, b"\x01" + NODE1) == NODE1
    assert balance.client_key(NODE1, None) == NODE1
    other = balance.client_key(NODE1, b"\xffsome-duid")
    assert other != NODE1 and len(other) != 6
    request = wire.parse_request(scapy_request("discover", NODE1, extra=[
        ("client_id", b"\xffsome-duid")]))
    assert request.client_id == b"\xffsome-duid" and request.secs == 0
    waited = bytearray(scapy_request("discover", NODE1))
    waited[8:10] = (0x0102).to_bytes(2, "big")
    assert wire.parse_request(bytes(waited)).secs == 0x0102


def test_a_replica_that_is_not_a_node_and_k_0_answer_every_client(cluster, db):
    lab = Responder(cluster, node_replica(cluster, None), Counter())
    assert lab.balancer is None and lab.respond(scapy_request("discover", NODE1))
    off = db.update("settings", "off", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, dhcp_answering=0)))
    assert len(answered_by(responders(off), scapy_request("discover", NODE1))) == 6


def test_role_dhcp_restricts_the_replicas_and_the_others_stand_by(cluster, db):
    def with_role(c):
        nodes = tuple(dataclasses.replace(n, roles=(*n.roles, "dhcp"))
                      if n.name in ("node2", "node3", "node5") else n for n in c.nodes)
        return changes.validated(dataclasses.replace(c, nodes=nodes))
    restricted = db.update("node set", "roles", with_role)
    assert balance.replica_names(restricted) == ("node2", "node3", "node5")
    offers = answered_by(responders(restricted), scapy_request("discover", NODE1))
    assert sorted(offers) == sorted(balance.choose(NODE1, ("node2", "node3", "node5"), 2))


def test_reload_keeps_decisions_and_transactions_of_an_unchanged_replica_set(cluster, db):
    service = DhcpService(node_replica(cluster, "node1"), cluster)
    before = service.responder.balancer
    newer = db.update("settings", "lease", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    service.reload(newer)
    after = service.responder.balancer
    assert after is not before and after.transactions is before.transactions
    assert after._decided is not before._decided and after._decided == before._decided


def test_settings_have_defaults_and_bad_values_are_named():
    settings = inventory.load(EXAMPLE).settings
    assert (settings.dhcp_answering, settings.dhcp_fallback_secs) == (2, 3)
    text = EXAMPLE.read_text().replace("lease_time = 3600", "lease_time = 3600\n"
                                       "dhcp_answering = -1")
    with pytest.raises(VlxError, match="dhcp_answering = -1: must be between 0 and 65535"):
        inventory.parse(text)

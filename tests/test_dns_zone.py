"""The cluster's zones built from the database, and the forwarding cache's bookkeeping
(bailiwick, TTLs, negative caching, bounds), without sockets."""

from __future__ import annotations

import ipaddress
from collections import Counter

import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from virtualinux.bootsvc import dns_wire as wire
from virtualinux.bootsvc.dns_cache import Cache, CacheEntry, Forwarder
from virtualinux.bootsvc.dns_zone import ClusterZones, lookup_message, reverse_zones
from virtualinux.vvcm import changes, inventory

from .conftest import EXAMPLE, vlx


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


@pytest.mark.parametrize("cidr, zones", [
    ("198.18.0.0/24", ["0.18.198.in-addr.arpa."]),
    ("198.18.0.0/23", ["0.18.198.in-addr.arpa.", "1.18.198.in-addr.arpa."]),
    ("198.18.0.64/26", ["0.18.198.in-addr.arpa."]),
    ("198.18.0.0/16", ["18.198.in-addr.arpa."]),
    ("198.18.0.0/15", ["18.198.in-addr.arpa.", "19.198.in-addr.arpa."]),
])
def test_reverse_zones_cover_the_network_on_octet_boundaries(cidr, zones):
    assert [str(z) for z in reverse_zones(ipaddress.IPv4Network(cidr))] == zones


def test_zones_hold_every_node_vm_and_the_gateway(cluster):
    zones = ClusterZones(cluster)
    assert [str(z) for z in zones.origins] == [
        "cluster.lab.", "0.18.198.in-addr.arpa.", "3.19.198.in-addr.arpa.",
        "4.19.198.in-addr.arpa.", "5.19.198.in-addr.arpa."]
    for node in cluster.nodes:
        reply = lookup_message(zones, f"{node.name}.cluster.lab", "A")
        assert reply.answer[0][0].to_text() == str(node.ip)
        back = lookup_message(zones, node.ip.reverse_pointer, "PTR")
        assert back.answer[0][0].to_text() == f"{node.name}.cluster.lab."
    for vm in cluster.vms:
        reply = lookup_message(zones, f"{vm.name}.{vm.vc}.cluster.lab", "A")
        assert reply.answer[0][0].to_text() == str(vm.ip)
    assert lookup_message(zones, "example.com", "A") is None          # forwarded
    assert lookup_message(zones, "7.100.51.198.in-addr.arpa", "PTR") is None


def test_a_new_generation_changes_the_answers_and_the_serial(db, cluster):
    newer = db.update("vc remove", "test", lambda c: changes.remove_vc(c, "pink"))
    before, after = ClusterZones(cluster), ClusterZones(newer)
    assert lookup_message(before, "pink-1.pink.cluster.lab", "A").answer
    assert lookup_message(after, "pink-1.pink.cluster.lab", "A").rcode() == dns.rcode.NXDOMAIN
    assert lookup_message(after, "1.5.19.198.in-addr.arpa", "PTR") is None   # zone gone
    assert lookup_message(after, "cluster.lab", "SOA").answer[0][0].serial == newer.generation


def test_vlx_dns_lookup_answers_like_a_replica(capsys, cluster):
    code, out, _ = vlx(capsys, "dns", "lookup", "node2.cluster.lab")
    assert code == 0 and "node2.cluster.lab. 300 IN A 198.18.0.12" in out
    code, out, _ = vlx(capsys, "dns", "lookup", "198.18.0.12", "--type", "PTR")
    assert code == 0 and "PTR node2.cluster.lab." in out
    code, out, _ = vlx(capsys, "dns", "lookup", "nosuch.cluster.lab")
    assert code == 0 and "NXDOMAIN" in out
    code, out, _ = vlx(capsys, "dns", "lookup", "example.com")
    assert code == 0 and "forwards it" in out and "198.18.1.53" in out
    code, _, err = vlx(capsys, "dns", "lookup", "node2.cluster.lab", "--type", "BOGUS")
    assert code == 2 and "BOGUS" in err


def forwarder(max_ttl=86400) -> Forwarder:
    counters: Counter[str] = Counter()
    return Forwarder(Cache(100, 1 << 20, counters), counters, 1.0, max_ttl)


def upstream_reply(name, rdtype, answer=(), authority=(), rcode=dns.rcode.NOERROR):
    query = dns.message.make_query(name, rdtype)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    reply.answer.extend(dns.rrset.from_text(*rr) for rr in answer)
    reply.authority.extend(dns.rrset.from_text(*rr) for rr in authority)
    return reply


def test_out_of_bailiwick_records_are_dropped_and_cname_chains_kept():
    fwd = forwarder()
    reply = upstream_reply("www.example.test", "A", answer=[
        ("www.example.test.", 300, "IN", "CNAME", "web.example.test."),
        ("web.example.test.", 200, "IN", "A", "198.51.100.1"),
        ("victim.other.test.", 9999, "IN", "A", "198.51.100.66"),
    ], authority=[("example.test.", 600, "IN", "NS", "ns.example.test."),
                  ("other.test.", 600, "IN", "NS", "evil.test.")])
    entry, ttl = fwd.entry(dns.name.from_text("www.example.test"), 1, reply, 1000.0)
    assert ttl == 200 and fwd.counters["dropped_out_of_bailiwick"] == 2
    parsed = reassemble("www.example.test", entry.body(1000.0))
    assert [str(r.name) for r in parsed.answer] == ["www.example.test.", "web.example.test."]
    assert [str(r.name) for r in parsed.authority] == ["example.test."]


def test_negative_answers_cache_for_the_soa_minimum_and_ttls_count_down():
    fwd = forwarder()
    soa = ("example.test.", 3600, "IN", "SOA", "ns.example.test. h.example.test. 1 2 3 4 30")
    missing = upstream_reply("nope.example.test", "A", authority=[soa], rcode=dns.rcode.NXDOMAIN)
    entry, ttl = fwd.entry(dns.name.from_text("nope.example.test"), 1, missing, 1000.0)
    assert ttl == 30
    bare = upstream_reply("nope.example.test", "A", rcode=dns.rcode.NXDOMAIN)
    assert fwd.entry(dns.name.from_text("nope.example.test"), 1, bare, 0.0)[1] == 0
    positive = upstream_reply("a.example.test", "A",
                              answer=[("a.example.test.", 120, "IN", "A", "198.51.100.2")])
    entry, ttl = fwd.entry(dns.name.from_text("a.example.test"), 1, positive, 1000.0)
    assert reassemble("a.example.test", entry.body(1000.4)).answer[0].ttl == 120
    assert reassemble("a.example.test", entry.body(1007.9)).answer[0].ttl == 113


def test_cache_is_bounded_in_entries_and_bytes_least_recently_used_first():
    counters: Counter[str] = Counter()
    cache = Cache(max_entries=3, max_bytes=10_000, counters=counters)

    def entry(size):
        return CacheEntry(0, 0, 0, bytes(size), (), (), 60, 0.0)

    for i in range(3):
        cache.put((b"%d" % i, 1), entry(10))
    assert cache.get((b"0", 1), 1.0) is not None          # 0 is now the most recent
    cache.put((b"3", 1), entry(10))
    assert cache.get((b"1", 1), 1.0) is None and len(cache) == 3
    cache.put((b"big", 1), entry(9_000))
    assert cache.bytes <= 10_000 and counters["cache_evicted"] >= 2
    assert cache.get((b"big", 1), 61.0) is None           # expired


def test_a_cached_rendering_holds_until_the_next_whole_second_or_the_expiry():
    cache = Cache(max_entries=3, max_bytes=10_000, counters=Counter())
    cache.put((b"a", 1), CacheEntry(0, 0, 0, b"", (), (), 120, 1000.0))
    assert cache.same_until((b"a", 1), 1000.4) == 1001.0
    assert cache.same_until((b"a", 1), 1005.9) == 1006.0
    assert cache.same_until((b"a", 1), 1119.5) == 1120.0
    assert cache.same_until((b"b", 1), 1000.0) == 0.0


def reassemble(name: str, body: wire.Body) -> dns.message.Message:
    query = wire.parse_query(dns.message.make_query(name, "A").to_wire())
    return dns.message.from_wire(wire.assemble(query, body, 65535))

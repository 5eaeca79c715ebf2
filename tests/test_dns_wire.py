"""The DNS fast path against dnspython: replies our tables build parse with
`dns.message.from_wire` and carry the right records; malformed queries (compression loops,
bad label types, names over 255 octets, short headers, huge counts) get FORMERR or are dropped,
counted by reason; a hypothesis fuzzer; and the corpus in tests/corpus/dns replayed."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtualinux.bootsvc import dns_wire as wire
from virtualinux.bootsvc.dns import DnsService, RateLimiter
from virtualinux.bootsvc.service import Replica
from virtualinux.vvcm import inventory

from .conftest import EXAMPLE

CORPUS = Path(__file__).parent / "corpus" / "dns"
NOT_OUTCOMES = {"queries", "slow_path", "formerr"}


@pytest.fixture
def service(db, tmp_path) -> DnsService:
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    replica = Replica(None, "lo", ipaddress.IPv4Address("198.18.0.1"), tmp_path, tmp_path)
    return DnsService(replica, cluster, DnsService.Options(port=0))


def ask(service: DnsService, query: dns.message.Message | bytes, udp: bool = True):
    data = query if isinstance(query, bytes) else query.to_wire()
    reply = service.respond(data, "198.18.0.200", udp)
    assert reply is None or isinstance(reply, bytes), "a local answer must not wait"
    return reply


def answer(service, name, rdtype, **kwargs) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)
    reply = dns.message.from_wire(ask(service, query))
    assert query.is_response(reply)
    return reply


def outcome(service: DnsService, data: bytes) -> str:
    before = dict(service.counters)
    ask(service, data)
    changed = sorted(key for key, value in service.counters.items()
                     if value != before.get(key, 0) and key not in NOT_OUTCOMES)
    assert len(changed) == 1, changed
    return changed[0]


def test_node_vm_gateway_and_ptr_answers_round_trip_through_dnspython(service):
    reply = answer(service, "node1.cluster.lab", "A")
    assert reply.flags & dns.flags.AA and reply.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in reply.answer[0]] == ["198.18.0.11"]
    assert answer(service, "gateway.cluster.lab", "A").answer[0][0].to_text() == "198.18.0.254"
    vm = answer(service, "green-2.green.cluster.lab", "A")
    assert vm.answer[0][0].to_text() == "198.19.3.2"
    ptr = answer(service, "2.3.19.198.in-addr.arpa", "PTR")
    assert ptr.answer[0][0].to_text() == "green-2.green.cluster.lab."
    assert answer(service, "12.0.18.198.in-addr.arpa", "PTR").answer[0][0].to_text() == \
        "node2.cluster.lab."
    assert answer(service, "254.0.18.198.in-addr.arpa", "PTR").answer[0][0].to_text() == \
        "gateway.cluster.lab."


def test_soa_ns_with_glue_and_the_same_bytes_from_any_replica(service, db, tmp_path):
    soa = answer(service, "cluster.lab", "SOA").answer[0][0]
    assert (str(soa.mname), str(soa.rname), soa.serial, soa.minimum) == \
        ("node1.cluster.lab.", "hostmaster.cluster.lab.", 1, 60)
    ns = answer(service, "cluster.lab", "NS")
    assert sorted(r.to_text() for r in ns.answer[0]) == [
        f"node{i}.cluster.lab." for i in range(1, 5)]
    assert len(ns.additional) == 4          # the servers' addresses as glue
    other = DnsService(Replica(None, "lo", ipaddress.IPv4Address("198.18.0.2"), tmp_path,
                               tmp_path), db.load())
    for name, rdtype in (("cluster.lab", "NS"), ("0.18.198.in-addr.arpa", "SOA"),
                         ("nope.cluster.lab", "A")):
        query = dns.message.make_query(name, rdtype).to_wire()
        assert ask(service, query) == ask(other, query), name


def test_unknown_names_in_our_zones_get_nxdomain_with_soa_and_known_ones_nodata(service):
    missing = answer(service, "nosuch.cluster.lab", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN and not missing.answer
    assert missing.authority[0].rdtype == dns.rdatatype.SOA
    assert str(missing.authority[0].name) == "cluster.lab."
    reverse = answer(service, "99.0.18.198.in-addr.arpa", "PTR")
    assert reverse.rcode() == dns.rcode.NXDOMAIN
    assert str(reverse.authority[0].name) == "0.18.198.in-addr.arpa."
    for name, rdtype in (("node1.cluster.lab", "AAAA"), ("node1.cluster.lab", "MX"),
                         ("green.cluster.lab", "A")):          # VC sub-domain: empty name
        nodata = answer(service, name, rdtype)
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer, name
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA, name
    assert service.counters["answered_local"] == 5


def test_question_case_id_rd_and_edns_are_echoed(service):
    query = dns.message.make_query("NoDe3.Cluster.LAB", "A", use_edns=0, payload=4096)
    query.flags &= ~dns.flags.RD
    reply = dns.message.from_wire(ask(service, query))
    assert reply.id == query.id and str(reply.question[0].name) == "NoDe3.Cluster.LAB."
    assert not reply.flags & dns.flags.RD and reply.edns == 0 and reply.payload == 1232
    assert str(reply.answer[0].name).lower() == "node3.cluster.lab."
    plain = dns.message.from_wire(ask(service, dns.message.make_query("node3.cluster.lab", "A")))
    assert plain.edns == -1 and plain.flags & dns.flags.RD


def test_local_udp_answers_are_kept_by_query_bytes_until_the_next_generation(service, db):
    query = dns.message.make_query("node4.cluster.lab", "A").to_wire()
    reply = ask(service, query)
    assert service._memo[query[2:]] == reply[2:]
    assert ask(service, query, udp=False) and len(service._memo) == 1     # TCP is not kept
    service.reload(db.load())
    assert service._memo == {}


def test_an_answer_over_the_udp_size_is_truncated_and_whole_over_tcp(service):
    query = wire.parse_query(dns.message.make_query("cluster.lab", "NS").to_wire())
    body = service.zones.lookup(query.qname, query.qtype)
    cut = dns.message.from_wire(wire.assemble(query, body, 40))
    assert cut.flags & dns.flags.TC and not cut.answer
    whole = dns.message.from_wire(wire.assemble(query, body, 65535))
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 4


def test_slow_path_takes_what_the_fast_parser_leaves(service):
    status = dns.message.make_query("node1.cluster.lab", "A")
    status.set_opcode(dns.opcode.STATUS)
    assert dns.message.from_wire(ask(service, status)).rcode() == dns.rcode.NOTIMP
    future = dns.message.make_query("node1.cluster.lab", "A", use_edns=1)
    assert dns.message.from_wire(ask(service, future)).rcode() == dns.rcode.BADVERS
    chaos = dns.message.make_query("version.bind", "TXT", "CH")
    assert dns.message.from_wire(ask(service, chaos)).rcode() == dns.rcode.REFUSED
    # An IXFR query carries the client's SOA in its authority section: not for the fast
    # parser, answered from the same tables (we keep no history: NODATA).
    ixfr = dns.message.make_query("cluster.lab", "IXFR")
    ixfr.authority.append(dns.rrset.from_text("cluster.lab.", 60, "IN", "SOA",
                                              "a. b. 0 1 1 1 1"))
    reply = dns.message.from_wire(ask(service, ixfr))
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert service.counters["slow_path"] == 3


def query_bytes(qname: bytes, counts=(1, 0, 0, 0), flags=0x0100, qid=0x4242) -> bytes:
    return struct.pack(">HH", qid, flags) + struct.pack(">HHHH", *counts) + qname + b"\0\1\0\1"


@pytest.mark.parametrize("data, expected", [
    (b"\x12\x34\x01", "dropped_short_header"),
    (query_bytes(b"\x05node1\x00", flags=0x8000), "dropped_is_response"),
    (query_bytes(b"\xc0\x0c"), "formerr_bad_pointer"),                       # a loop
    (query_bytes(b"\x40" + b"a" * 64 + b"\x00"), "formerr_bad_label_type"),  # label > 63
    (query_bytes(b"\x3f" + b"a" * 63), "formerr_truncated"),
    (query_bytes(b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"),
     "formerr_name_too_long"),
    (query_bytes(b"\x05node1\x00", counts=(65535, 65535, 65535, 65535)),
     "formerr_counts_too_large"),
    (query_bytes(b"\x05node1\x00") + b"junk", "formerr_trailing_junk"),
    (query_bytes(b"\x05node1\x00", counts=(0, 0, 0, 0))[:12], "formerr_question_count"),
])
def test_malformed_queries_get_formerr_or_are_dropped_by_reason(service, data, expected):
    assert outcome(service, data) == expected
    reply = ask(service, data)
    if expected.startswith("formerr"):
        parsed = dns.message.from_wire(reply)
        assert parsed.rcode() == dns.rcode.FORMERR and parsed.id == 0x4242
    else:
        assert reply is None


def test_rate_limiter_keeps_a_flooder_from_the_others_and_stays_bounded():
    limiter = RateLimiter(rate=10, burst=5, max_sources=100)
    allowed = sum(limiter.allow("198.18.0.66", 0.0) for _ in range(1000))
    assert allowed == 5
    assert limiter.allow("198.18.0.67", 0.0)          # another source is not starved
    assert limiter.allow("198.18.0.66", 1.0)          # refilled after a second
    for i in range(1000):
        limiter.allow(f"198.19.{i // 256}.{i % 256}", 2.0)
    assert len(limiter) <= 100


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=600),
    st.tuples(st.sampled_from(["node1.cluster.lab", "x.green.cluster.lab", "cluster.lab"]),
              st.integers(0, 700), st.binary(min_size=1, max_size=8)).map(
        lambda t: _mutate(dns.message.make_query(t[0], "A", use_edns=0).to_wire(), t[1], t[2]))))
def test_fuzzed_queries_never_raise_and_replies_parse(service, data):
    reply = service.respond(data, "198.18.0.200", True)
    if isinstance(reply, bytes):
        parsed = dns.message.from_wire(reply)
        assert parsed.id == int.from_bytes(data[:2], "big")
    elif reply is not None:       # a name to forward: the coroutine is not needed here
        reply.close()


def _mutate(data: bytes, position: int, insert: bytes) -> bytes:
    position %= len(data) + 1
    return data[:position] + insert + data[position + len(insert):]


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.bin"))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_input_gets_the_outcome_its_name_records(service, path):
    """Files are named OUTCOME--WHAT.bin; OUTCOME is the counter the query moves."""
    assert outcome(service, path.read_bytes()) == path.name.split("--", 1)[0]


def test_corpus_is_not_empty():
    assert len(corpus_files()) >= 10


def test_external_names_without_upstreams_get_servfail_at_once(service, db):
    cluster = db.load()
    service.reload(dataclasses.replace(cluster, settings=dataclasses.replace(
        cluster.settings, upstream_dns=())))
    reply = dns.message.from_wire(ask(service, dns.message.make_query("example.com", "A")))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert service.counters["servfail_no_upstream"] == 1


def test_the_udp_thread_answers_counts_survives_a_bug_and_stops(db, tmp_path):
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    replica = Replica(None, "lo", ipaddress.IPv4Address("127.0.0.1"), tmp_path, tmp_path)
    service = DnsService(replica, cluster, DnsService.Options(port=0))
    zones = service._local[0]
    lookup = zones.lookup

    def broken_for_node3(qname: bytes, qtype: int):
        if qname.startswith(b"\x05node3"):
            raise RuntimeError("a bug")
        return lookup(qname, qtype)

    zones.lookup = broken_for_node3     # type: ignore[method-assign]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(30)               # a safety net: every reply below is awaited

    def exchange(data: bytes, reply: bool = True) -> bytes | None:
        client.sendto(data, ("127.0.0.1", service.port))
        return client.recv(4096) if reply else None

    async def scenario() -> list:
        await service.start()
        try:
            node2 = dns.message.make_query("node2.cluster.lab", "A").to_wire()
            replies = [await asyncio.to_thread(exchange, node2) for _ in range(2)]
            await asyncio.to_thread(exchange, dns.message.make_query(
                "node3.cluster.lab", "A").to_wire(), False)   # breaks: no reply, no crash
            replies.append(await asyncio.to_thread(exchange, dns.message.make_query(
                "node1.cluster.lab", "A").to_wire()))
            replies.append(await asyncio.to_thread(     # malformed: FORMERR
                exchange, b"\x12\x34\x01\x00\xff\xff" + bytes(8)))
            return replies
        finally:
            await service.stop()

    try:
        first, kept, node1, formerr = asyncio.run(scenario())
    finally:
        client.close()
    assert first == kept and "198.18.0.12" in dns.message.from_wire(first).answer[0].to_text()
    assert "198.18.0.11" in dns.message.from_wire(node1).answer[0].to_text()
    assert formerr[:2] == b"\x12\x34" and formerr[3] & 0xF == wire.FORMERR
    assert service._udp_thread is not None and not service._udp_thread.is_alive()
    counters = service.counters        # the thread's counts are folded in on stop
    assert counters["queries"] == 5 and counters["answered_local"] == 3
    assert counters["formerr_counts_too_large"] == 1 and counters["internal_error"] == 1

"""bootsvc/udp_batch.py: batched UDP through recvmmsg/sendmmsg, and its recvmsg/sendto fallback,
over real sockets on loopback (in a network namespace of the test's own when run as root);
then the DNS service's UDP thread fed whole batches: good queries with bad ones among them,
and a flood limited per source across batches."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import socket
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest
from virtualinux.bootsvc import udp_batch
from virtualinux.bootsvc.dns import DnsService
from virtualinux.bootsvc.service import Replica
from virtualinux.bootsvc.udp_batch import MmsgBatch, PlainBatch, open_batch, peer_address, peer_of
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import inventory

from .conftest import EXAMPLE

KINDS = [MmsgBatch, PlainBatch]


@pytest.fixture
def sockets(request) -> Iterator:
    """make(host="127.0.0.1") -> a bound UDP socket, in a fresh namespace when root (every
    socket of one test in the same one), else on this process's loopback; all closed after."""
    made: list[socket.socket] = []
    namespace = None
    if os.geteuid() == 0:
        namespace = request.getfixturevalue("netns").namespace("udp")

    def make(host: str = "127.0.0.1") -> socket.socket:
        def open_one() -> socket.socket:
            if namespace is not None:
                from pyroute2 import netns as pyroute2_netns
                pyroute2_netns.setns(namespace.name, flags=0)   # this thread only
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            return sock

        box: list[socket.socket] = []
        thread = threading.Thread(target=lambda: box.append(open_one()))
        thread.start()
        thread.join()
        sock = box[0]
        made.append(sock)
        sock.settimeout(30)          # a safety net: every datagram below is awaited
        return sock

    yield make
    for sock in made:
        sock.close()


def test_peer_tokens_are_the_kernels_sockaddr_in_and_round_trip():
    peer = peer_of(("198.18.0.7", 5353))
    assert len(peer) == 16 and peer[udp_batch.HOST] == socket.inet_aton("198.18.0.7")
    assert peer_address(peer) == ("198.18.0.7", 5353)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_round_trips_and_each_reply_reaches_its_own_sender(sockets, kind):
    server, first, second = sockets(), sockets(), sockets("127.0.0.2")
    batch = kind(server, count=8, size=512)
    for i in range(3):
        first.sendto(b"first %d" % i, server.getsockname())
        second.sendto(b"second %d" % i, server.getsockname())
    datagrams, peers = batch.receive()
    assert sorted(datagrams) == sorted([b"first %d" % i for i in range(3)] +
                                       [b"second %d" % i for i in range(3)])
    assert {peer_address(p) for p in peers} == {first.getsockname(), second.getsockname()}
    assert batch.send([d.upper() for d in datagrams], peers) == (0, 0)
    assert sorted(first.recv(100) for _ in range(3)) == [b"FIRST %d" % i for i in range(3)]
    assert sorted(second.recv(100) for _ in range(3)) == [b"SECOND %d" % i for i in range(3)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_receive_takes_at_most_count_and_the_rest_comes_next(sockets, kind):
    server, client = sockets(), sockets()
    batch = kind(server, count=4, size=64)
    for i in range(6):
        client.sendto(b"%d" % i, server.getsockname())
    assert batch.receive()[0] == [b"0", b"1", b"2", b"3"]
    assert batch.receive()[0] == [b"4", b"5"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_datagram_too_long_is_dropped_and_counted_among_good_ones(sockets, kind):
    server, client = sockets(), sockets()
    batch = kind(server, count=8, size=64)
    for data in (b"good 1", b"x" * 65, b"", b"y" * 64, b"good 2"):
        client.sendto(data, server.getsockname())
    datagrams, peers = batch.receive()
    # The empty datagram is a real one (it has a sender); 64 octets fit exactly.
    assert datagrams == [b"good 1", b"", b"y" * 64, b"good 2"] and len(peers) == 4
    assert batch.truncated == 1


@pytest.mark.parametrize("kind", KINDS)
def test_send_goes_on_past_a_destination_that_fails(sockets, kind):
    server, client = sockets(), sockets()
    batch = kind(server, count=8, size=64)
    client.sendto(b"q", server.getsockname())
    _, peers = batch.receive()
    # Broadcast without SO_BROADCAST: EACCES for that one datagram only.
    refused = peer_of(("255.255.255.255", 9))
    full, failed = batch.send([b"one", b"lost", b"two" * 100, b"three"],
                              [peers[0], refused, peers[0], peers[0]])
    assert (full, failed) == (0, 1)
    # Longer than a slot is fine: replies are packed back to back.
    assert [client.recv(1000) for _ in range(3)] == [b"one", b"two" * 100, b"three"]


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_wakes_a_waiting_receive_with_an_empty_batch(sockets, kind):
    server = sockets()
    batch = kind(server, count=8, size=64)
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(batch.receive()))
    waiter.start()
    try:
        server.shutdown(socket.SHUT_RD)     # Linux: wakes UDP readers though unconnected
    except OSError:
        pass
    waiter.join(30)
    assert not waiter.is_alive() and result == [([], [])]


def test_open_batch_takes_mmsg_for_ipv4_and_falls_back_for_others(sockets):
    assert isinstance(open_batch(sockets()), MmsgBatch)
    six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        assert isinstance(open_batch(six), PlainBatch)
    finally:
        six.close()


# -- the DNS service's UDP thread on batches --------------------------------------------------

def _service(db, tmp_path, **options) -> DnsService:
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    replica = Replica(None, "lo", ipaddress.IPv4Address("127.0.0.1"), tmp_path, tmp_path)
    return DnsService(replica, cluster, DnsService.Options(port=0, vc_networks=False,
                                                          **options))


def _batch_against(service: DnsService, client: socket.socket, burst: list[bytes],
                   settled) -> None:
    """Start `service`, send `burst` at once, wait until `settled(counters)`, stop it."""
    async def scenario() -> None:
        await service.start()
        try:
            for data in burst:
                client.sendto(data, ("127.0.0.1", service.port))
            await asyncio.to_thread(wait_for, lambda: settled(service.counters), 30,
                                    "the UDP thread to count the burst")
        finally:
            await service.stop()
    asyncio.run(scenario())


def test_a_batch_with_bad_queries_among_good_ones_answers_each_as_alone(db, tmp_path):
    service = _service(db, tmp_path)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(30)
    good = [dns.message.make_query(f"node{i % 3 + 1}.cluster.lab", "A") for i in range(12)]
    burst = [q.to_wire() for q in good]
    burst.insert(3, b"\x12\x34\x01\x00\xff\xff" + bytes(8))            # FORMERR
    burst.insert(7, b"\x12")                                             # dropped: short
    burst.insert(9, bytes(12) + b"\x05" * 4100)                          # dropped: too long
    try:
        _batch_against(service, client, burst,
                       lambda c: c["queries"] + c["dropped_oversized"] >= 15)
        replies = [client.recv(4096) for _ in range(13)]
    finally:
        client.close()
    by_id = {int.from_bytes(r[:2], "big"): r for r in replies}
    for query in good:
        answer = dns.message.from_wire(by_id[query.id])
        assert query.is_response(answer) and answer.answer
    assert dns.message.from_wire(by_id[0x1234]).rcode() == dns.rcode.FORMERR
    counters = service.counters
    assert counters["answered_local"] == 12 and counters["formerr_counts_too_large"] == 1
    assert counters["dropped_short_header"] == 1 and counters["dropped_oversized"] == 1


def test_rate_limiting_holds_per_source_when_a_burst_comes_in_batches(db, tmp_path):
    service = _service(db, tmp_path, rate_limit=1, rate_burst=5)
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flooder.bind(("127.0.0.1", 0))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    query = dns.message.make_query("node1.cluster.lab", "A").to_wire()
    took: list[float] = []
    try:
        async def scenario() -> None:
            await service.start()
            start = time.monotonic()
            try:
                for _ in range(40):
                    flooder.sendto(query, ("127.0.0.1", service.port))
                other.sendto(query, ("127.0.0.1", service.port))
                await asyncio.to_thread(
                    wait_for, lambda: service.counters["rate_limited"]
                    + service.counters["queries"] >= 41, 30, "the flood to be counted")
                took.append(time.monotonic() - start)
            finally:
                await service.stop()
        asyncio.run(scenario())
        other.settimeout(30)
        assert other.recv(4096)[2:] == service._memo[query[2:]]     # not starved
    finally:
        flooder.close()
        other.close()
    counters = service.counters
    # A bucket of 5 refilling at 1/s: 5 of the flood answered, one more per second it took;
    # the other source's query besides.
    assert 5 + 1 <= counters["queries"] <= 5 + 1 + math.ceil(took[0])
    assert counters["queries"] + counters["rate_limited"] == 41

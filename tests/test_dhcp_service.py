"""DhcpService's sockets: a thread per socket that reads one datagram at a time below
saturation and batches under load, answers every datagram or counts it, and ends with stop()."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
import time

import pytest
from virtualinux.bootsvc import dhcp
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.dhcp import SINGLES, DhcpService
from virtualinux.bootsvc.service import Replica
from virtualinux.bootsvc.udp_batch import peer_of
from virtualinux.vvcm import inventory

from .conftest import EXAMPLE
from .test_dhcp_responder import NODE1, replica
from .test_dhcp_wire import scapy_request

PEER = peer_of(("198.18.0.77", 68))


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


def test_a_batch_gets_each_answer_and_garbage_and_bugs_are_counted(cluster):
    service = DhcpService(replica(), cluster)
    valid = scapy_request("discover", NODE1, xid=7)
    real_respond = service.responder.respond

    def respond(data, interface=None):
        if data == b"bug":
            raise KeyError("a bug in the responder")
        return real_respond(data, interface)
    service.responder.respond = respond
    replies, destinations = service._answer_batch(
        [valid, valid[:100], b"bug", valid], [PEER] * 4, None)
    assert [wire.decode(reply).xid for reply in replies] == [7, 7]
    # Not back to the sender: a client without an address gets a broadcast.
    assert destinations == [peer_of(("255.255.255.255", 68))] * 2
    assert service.counters["DHCPOFFER"] == 2 and service.counters["dropped_short"] == 1
    assert service.counters["internal_error"] == 1


def _wait(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs root")
def test_a_burst_queued_while_busy_is_read_in_batches_and_stop_ends_the_thread(
        cluster, tmp_path):
    """The thread reads a lone datagram, then the burst that queued while it waited for the
    lock (held here, as a long answer would) in batches; every datagram is counted once, and
    stop() leaves no thread behind."""
    lo = Replica(None, "lo", ipaddress.IPv4Address("127.0.0.1"), tmp_path, tmp_path)
    burst = 3 * SINGLES + 40

    async def run() -> tuple[list[int], dict[str, int]]:
        service = DhcpService(lo, cluster, DhcpService.Options(port=0, vc_networks=False))
        batches: list[int] = []
        answer_batch = service._answer_batch

        def spy(datagrams, peers, interface):
            batches.append(len(datagrams))
            return answer_batch(datagrams, peers, interface)
        service._answer_batch = spy
        await service.start()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            port = service.port
            assert [t.name for t in threading.enumerate()].count("dhcp-lo") == 1
            request = scapy_request("discover", NODE1)
            with service._lock:        # busy: what comes now queues in the kernel
                client.sendto(request, ("127.0.0.1", port))
                for _ in range(burst):
                    client.sendto(request, ("127.0.0.1", port))
                client.sendto(b"short", ("127.0.0.1", port))
            # 127.0.0.1 is on no network of the cluster: each DISCOVER is read and counted,
            # and gets no answer.
            await asyncio.to_thread(_wait, lambda: service.counters["DHCPDISCOVER"] == burst + 1
                                    and service.counters["dropped_short"] == 1)
        finally:
            client.close()
            await service.stop()
        assert "dhcp-lo" not in [t.name for t in threading.enumerate()]
        return batches, dict(service.counters)

    batches, counters = asyncio.run(run())
    assert counters["ignored_no_network"] == burst + 1
    assert max(batches) > 1, batches       # the queue was taken in batches


def test_a_datagram_longer_than_the_limit_is_dropped_and_counted(cluster, tmp_path,
                                                                 monkeypatch):
    """Both ways of reading drop and count a datagram over MAX_DATAGRAM (a smaller limit here,
    as no UDP datagram over IPv4 can exceed the real one)."""
    if os.geteuid() != 0:
        pytest.skip("SO_BINDTODEVICE needs root")
    monkeypatch.setattr(dhcp, "MAX_DATAGRAM", 1000)
    lo = Replica(None, "lo", ipaddress.IPv4Address("127.0.0.1"), tmp_path, tmp_path)

    async def run() -> dict[str, int]:
        service = DhcpService(lo, cluster, DhcpService.Options(port=0, vc_networks=False))
        await service.start()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            request = scapy_request("discover", NODE1)
            # A batch of one: the next SINGLES come by single reads, then a batch again.
            client.sendto(request, ("127.0.0.1", service.port))
            await asyncio.to_thread(_wait, lambda: service.counters["DHCPDISCOVER"] == 1)
            for sent in range(1, 2 + SINGLES):
                client.sendto(request + bytes(2000), ("127.0.0.1", service.port))
                await asyncio.to_thread(
                    _wait, lambda n=sent: service.counters["dropped_oversized"] == n)
        finally:
            client.close()
            await service.stop()
        return dict(service.counters)

    counters = asyncio.run(run())
    assert counters["DHCPDISCOVER"] == 1 and counters["dropped_oversized"] == 1 + SINGLES

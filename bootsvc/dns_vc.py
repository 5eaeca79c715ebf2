"""DNS for VMs: the dns service's listeners on the service addresses of the VC bridges here.

A VM is told (by DHCP) to ask its VC's service address, which every node hosting the VC holds
on the VC's bridge (vvcm.virt.network). Here each such address present on this node gets a
UDP socket and a TCP server on the service's port, answering through the same `respond` as
the replica's own address: the same zones (a VM `NAME-N` of VC `NAME` is `NAME-N.NAME.DOMAIN`,
and DHCP gives the VM `NAME.DOMAIN` as search list), the same cache and rate limits. The
addresses follow the bridges (`vc_links.LinkFollower`) and the generation (`reload`).
Kept apart from dns.py, whose hot path serves the replica's own address and replies through
its one socket: a VC's few queries go through the plain loop below, which replies through the
socket the query came in on (the address the VM asked). Folding it into the hot path means
handing `_send` the socket.
Imports `dns_wire` and `vc_links`; the dns service hands itself in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from virtualinux.vvcm import Cluster

from .vc_links import LinkFollower, Present, served_here, vc_interfaces

if TYPE_CHECKING:
    from .dns import DnsService

log = logging.getLogger(__name__)

DRAIN_BATCH = 64
MAX_QUERY = 4096


class VcListeners:
    def __init__(self, service: DnsService):
        self.service = service
        self.links = LinkFollower(self._links_changed, service.counters)
        self._udp: dict[ipaddress.IPv4Address, socket.socket] = {}
        self._tcp: dict[ipaddress.IPv4Address, asyncio.Server] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sync = asyncio.Lock()

    @property
    def counters(self):
        """The service's counters as the event loop sees them (this class runs only there)."""
        return self.service.counters

    @property
    def addresses(self) -> list[str]:
        return [str(address) for address in sorted(self._udp)]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.links.start()
        await self._reconcile()

    async def stop(self) -> None:
        await self.links.stop()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        for address in list(self._udp):
            self._close(address)
        self._loop = None

    def reload(self, cluster: Cluster) -> None:
        del cluster     # the service holds it; the addresses are worked out from there
        self._links_changed(self.links.present)

    def _links_changed(self, present: Present) -> None:
        if self._loop is not None:
            self._spawn(self._reconcile())

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self) -> None:
        """Listen on every VC service address that is here and in this generation."""
        async with self._sync:
            wanted = {served.address.ip for served in served_here(
                vc_interfaces(self.service.cluster), self.links.present)}
            for address in sorted(set(self._udp) - wanted):
                self._close(address)
                log.info("dns no longer on %s", address)
            for address in sorted(wanted - set(self._udp)):
                try:
                    await self._open(address)
                except OSError as err:       # gone again meanwhile: the next event tells
                    self.counters["vc_listen_errors"] += 1
                    log.warning("dns cannot listen on %s: %s", address, err)
                    continue
                log.info("dns on %s:%d (udp, tcp) for a VC", address, self.service.port)

    async def _open(self, address: ipaddress.IPv4Address) -> None:
        assert self._loop is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(address), self.service.port))
            sock.setblocking(False)
            server = await asyncio.start_server(self.service._tcp_client, str(address),
                                                self.service.port, reuse_address=True)
        except OSError:
            sock.close()
            raise
        self._udp[address] = sock
        self._tcp[address] = server
        self._loop.add_reader(sock.fileno(), self._drain, address, sock)

    def _close(self, address: ipaddress.IPv4Address) -> None:
        sock = self._udp.pop(address, None)
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        server = self._tcp.pop(address, None)
        if server is not None:
            server.close()

    def _drain(self, address: ipaddress.IPv4Address, sock: socket.socket) -> None:
        if self._udp.get(address) is not sock:    # closed between the wake-up and now
            return
        limiter = self.service.limiter
        for _ in range(DRAIN_BATCH):
            try:
                data, source = sock.recvfrom(MAX_QUERY)
            except BlockingIOError:
                return
            except OSError as err:
                self.counters["receive_errors"] += 1
                log.debug("dns receive error on %s: %s", address, err)
                return
            if limiter is not None and not limiter.allow(source[0], time.monotonic()):
                self.counters["rate_limited"] += 1
                continue
            reply = self.service.respond(data, source[0], True)
            if reply is None:
                continue
            if isinstance(reply, bytes):
                self._send(sock, reply, source)
            else:
                self._spawn(self._send_later(sock, reply, source))

    async def _send_later(self, sock: socket.socket, reply: Awaitable[bytes],
                          destination: tuple[str, int]) -> None:
        self._send(sock, await reply, destination)

    def _send(self, sock: socket.socket, reply: bytes, destination: tuple[str, int]) -> None:
        if sock.fileno() < 0:
            return
        try:
            sock.sendto(reply, destination)
        except BlockingIOError:
            self.counters["dropped_send_buffer_full"] += 1
        except OSError as err:
            self.counters["send_errors"] += 1
            log.debug("dns send to %s failed: %s", destination[0], err)

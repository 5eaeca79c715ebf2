"""The `ra` service: IPv6 router advertisements that say "no default router here".

iPXE (Debian's ROM, like most) waits in "Configuring (net0 ...)" for IPv6 autoconfiguration
until it times out when no router advertises on the segment: about 13 s of every network boot
(shared/LAB.md). An RA with router lifetime 0, no prefix and the M/O flags clear ends that
wait at once and gives clients nothing: no address, no route, no DHCPv6. Lifetime 0 only says
"this sender is not a default router"; routers that do advertise one keep theirs, so the RA
does no harm beside a real IPv6 router. A cluster network whose router hands out M/O flags
runs without this service (it is opt-out: leave `ra` out of `--services`).

Sent from the interface's link-local address with hop limit 255 (RFC 4861 6.1.2: clients drop
anything else) every 3-4 s, and at once (unicast) in answer to a valid router solicitation.
Rate-limited, so a flood of solicitations costs us little. The packet is built once
(`advertisement`); a raw ICMPv6 socket sends it (the kernel fills in the checksum).
Imports the service interface only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import socket
import struct
import time

from virtualinux.vvcm import Cluster, VlxError

from .service import Replica, Service

log = logging.getLogger(__name__)

ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
OPTION_SOURCE_LINK_LAYER = 1     # RFC 4861 4.6.1; its length counts 8-byte units
ICMP6_FILTER = 1             # <netinet/icmp6.h>; Python does not name it
IFA_F_TENTATIVE = 0x40       # <linux/if_addr.h>: duplicate address detection still running
SCOPE_LINK = 253


class RsError(Exception):
    """A router solicitation that RFC 4861 6.1.1 says to drop; `reason` names the check."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_solicitation(data: bytes, hop_limit: int | None) -> None:
    """Raise RsError unless `data` (an ICMPv6 message, IPv6 header stripped) is a valid RS."""
    if hop_limit != 255:
        raise RsError("hop_limit")   # sent from off the link, or forged
    if len(data) < 8:
        raise RsError("short")
    if data[0] != ROUTER_SOLICITATION or data[1] != 0:
        raise RsError("type_code")
    options = data[8:]
    while options:
        if len(options) < 2 or options[1] == 0 or len(options) < options[1] * 8:
            raise RsError("bad_option")
        options = options[options[1] * 8:]


def advertisement(mac: str, hop_limit: int = 0) -> bytes:
    """The RA's ICMPv6 bytes: router lifetime 0, M=O=0, default router preference medium
    (RFC 4191 wants it when the lifetime is 0), no reachable time or retransmit timer, no
    prefix; the sender's MAC as source link-layer address (clients need not resolve it;
    harmless either way). The checksum is left 0: the kernel fills it in on a raw ICMPv6
    socket. Packed with `struct` (scapy's `ICMPv6ND_RA` is the tests' oracle): importing
    scapy's IPv6 layers cost every replica 42 MB and ~2 s of a TCG node's CPU at boot."""
    hardware = _octets(mac)
    header = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, hop_limit, 0, 0, 0, 0)
    source_link_layer = struct.pack("!BB", OPTION_SOURCE_LINK_LAYER, 1) + hardware
    return header + source_link_layer


def _octets(mac: str) -> bytes:
    """The six bytes of `mac` ("52:54:00:ab:cd:ef"), or ValueError."""
    octets = bytes.fromhex(mac.replace(":", ""))
    if len(octets) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return octets


def link_local(index: int) -> ipaddress.IPv6Address | None:
    """The interface's usable (DAD finished) link-local address, if it has one."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET6, index=index):
            if msg["scope"] != SCOPE_LINK:
                continue
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            if not flags & IFA_F_TENTATIVE:
                return ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS"))
    return None


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac` (RFC 4291 App. A)."""
    octets = _octets(mac)
    identifier = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + identifier)


def ensure_link_local(index: int, mac: str) -> None:
    """Give the interface a link-local address if it has none at all (addrgenmode none, or
    flushed): an RA must come from one. Tentative ones count: DAD finishes on its own."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if any(msg["scope"] == SCOPE_LINK
               for msg in ipr.get_addr(family=socket.AF_INET6, index=index)):
            return
        ipr.addr("add", index=index, address=str(eui64_link_local(mac)), prefixlen=64,
                 scope=SCOPE_LINK)


def interface_mac(index: int) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")


class RaService(Service):
    name = "ra"

    @dataclasses.dataclass(frozen=True)
    class Options:
        # RFC 4861 allows 3 s at least; LAB.md measured 3-4 s ending iPXE's wait.
        min_interval: float = 3.0
        max_interval: float = 4.0
        # Answers to solicitations per second, beyond which they are counted and dropped.
        max_answers_per_second: int = 100

    def __init__(self, replica: Replica, cluster: Cluster, options: Options | None = None):
        super().__init__(replica, cluster, options)
        self.options: RaService.Options
        if not 3.0 <= self.options.min_interval <= self.options.max_interval:
            raise VlxError("ra: intervals must satisfy 3 <= min_interval <= max_interval")
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._index = 0
        self._packet = b""
        self._source: ipaddress.IPv6Address | None = None
        self._window = (0, 0)     # (the second it counts, answers in it)
        self._logged: set[str] = set()

    async def start(self) -> None:
        try:
            self._index = socket.if_nametoindex(self.replica.interface)
        except OSError:
            raise VlxError(f"ra: no network interface {self.replica.interface!r}") from None
        # pyroute2's synchronous calls run their own event loop: keep them off ours.
        mac = await asyncio.to_thread(interface_mac, self._index)
        try:
            await asyncio.to_thread(ensure_link_local, self._index, mac)
        except Exception as err:    # pyroute2's NetlinkError, or IPv6 off on the interface
            raise VlxError(f"ra: {self.replica.interface} has no IPv6 link-local address and "
                           f"cannot get one (is net.ipv6.conf.{self.replica.interface}."
                           f"disable_ipv6 set?): {err}") from None
        self._packet = advertisement(mac)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            self.replica.interface.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            # Only solicitations reach us: a set bit blocks that ICMPv6 type.
            blocked = [0xFFFFFFFF] * 8
            blocked[ROUTER_SOLICITATION >> 5] &= ~(1 << (ROUTER_SOLICITATION & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *blocked))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                            socket.inet_pton(socket.AF_INET6, ALL_ROUTERS)
                            + struct.pack("@I", self._index))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise VlxError(f"ra: cannot open the ICMPv6 socket on "
                           f"{self.replica.interface}: {err}") from None
        self._sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._on_readable, sock)
        self._task = asyncio.create_task(self._advertise(sock))
        log.info("ra on %s: router lifetime 0, no prefix, every %g-%g s",
                 self.replica.interface, self.options.min_interval, self.options.max_interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def details(self) -> dict[str, object]:
        return {"source": str(self._source) if self._source else None}

    async def _advertise(self, sock: socket.socket) -> None:
        # Right after start the link-local address may still be in duplicate address
        # detection (about 1 s): try every half second until the first RA is out.
        while True:
            if self._source is None:
                self._source = await asyncio.to_thread(link_local, self._index)
            sent = self._send(ALL_NODES, sock)
            await asyncio.sleep(random.uniform(self.options.min_interval,
                                               self.options.max_interval) if sent else 0.5)

    def _send(self, destination: str, sock: socket.socket) -> bool:
        if self._source is None:
            self.counters["ra_waiting_link_local"] += 1
            return False
        # The source is set explicitly: a client drops an RA that is not from a link-local.
        info = self._source.packed + struct.pack("@I", self._index)
        try:
            sock.sendmsg([self._packet], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                                 info)],
                               0, (destination, 0, 0, self._index))
        except OSError as err:
            self.counters["ra_send_errors"] += 1
            self._log_once("send", "ra: cannot send on %s: %s", self.replica.interface, err)
            self._source = None     # the address may have gone: _advertise looks again
            return False
        self.counters["ra_sent"] += 1
        return True

    def _on_readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _flags, sender = sock.recvmsg(1500, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.counters["rs_receive_errors"] += 1
                self._log_once("recv", "ra: receive failed: %s", err)
                return
            hop_limit = next((struct.unpack("@i", value[:4])[0]
                              for level, kind, value in ancillary
                              if level == socket.IPPROTO_IPV6
                              and kind == socket.IPV6_HOPLIMIT), None)
            source = sender[0].split("%")[0]
            try:
                parse_solicitation(data, hop_limit)
            except RsError as err:
                self.counters[f"rs_dropped_{err.reason}"] += 1
                self._log_once(source, "ra: dropped a router solicitation from %s (%s)",
                               source, err.reason)
                continue
            self.counters["rs_received"] += 1
            if not self._may_answer():
                self.counters["rs_rate_limited"] += 1
                continue
            # From "::" (no address yet) the answer can only go to all nodes (RFC 4861 6.2.6).
            self._send(ALL_NODES if source == "::" else source, sock)

    def _may_answer(self) -> bool:
        now = int(time.monotonic())
        start, answers = self._window
        if start != now:
            start, answers = now, 0
        self._window = (start, answers + 1)
        return answers < self.options.max_answers_per_second

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged and len(self._logged) < 4096:
            self._logged.add(key)
            log.warning(message, *args)


SERVICE = RaService

"""The DHCP service: UDP 67 on the replica's interface and on each VC bridge here, answered by
`dhcp_responder.Responder` (what each request gets, from the database generation alone).

`DhcpService` binds UDP 67 on the replica's interface, and one more socket per VC bridge here
(`vc_links` follows them through netlink), each with SO_BINDTODEVICE: the arriving interface
is the socket's, a broadcast reply leaves by it without per-packet control messages, and each
network has its own receive buffer, so a VM flooding its bridge cannot crowd out the nodes'
boots on the cluster network (one socket with IP_PKTINFO would share one buffer and receive on
interfaces we do not serve).
Imports the model, `balance`, `dhcp_responder`, `dhcp_wire`, `udp_batch` and `vc_links`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading

from virtualinux.vvcm import Cluster

from . import balance
from . import dhcp_wire as wire
from .dhcp_responder import LOG_ONCE_LIMIT, Reply, Responder
from .service import Replica, Service, check_port, set_receive_buffer
from .status import Status
from .udp_batch import open_batch, peer_address, peer_of, send_counted
from .vc_links import LinkFollower, Present, served_here, vc_interfaces

log = logging.getLogger(__name__)

# Room for a burst of DORA from a rack powering on at once.
RECEIVE_BUFFER = 4 << 20
# Datagrams a socket's thread takes per recvmmsg (what is queued, up to this), and replies it
# sends per sendmmsg. Each slot holds a MAX_DATAGRAM, both ways: 64 slots took 8 MiB of RSS
# per socket, 16 take 2 MiB and already share a system call among 16 datagrams.
BATCH = 16
# Bigger than any DHCP message (RFC 2131 allows up to the client's option 57, at most 64 KiB
# in UDP); a longer datagram is dropped, not parsed.
MAX_DATAGRAM = 65535
# Single reads (recvfrom) after a batch of one, before a recvmmsg looks at the queue again.
SINGLES = 8
# MSG_TRUNC as a plain int (the enum's & costs microseconds): recvfrom_into then returns a
# datagram's whole length, so one longer than the buffer is seen, and dropped.
MSG_TRUNC = int(socket.MSG_TRUNC)
# How long stop() waits for a socket's thread to see its socket shut down.
JOIN_S = 5
# The key of details() under which the discovery pool's answers are reported.
DISCOVERED = "discovered"
# The key of details() listing the VC bridges served here.
VC_INTERFACES = "vc_interfaces"


class DhcpService(Service):
    """UDP 67 on the replica's interface and on each VC bridge here. Each socket is read by a
    thread of its own, blocking in the kernel as DNS does (no event-loop round per wake-up,
    which cost more than the answer): one datagram per call below saturation, batches under
    load (`_serve`). The threads answer holding one lock (the responder's caches and the
    balancer's transactions are shared); the event loop only swaps in a new responder and
    opens and closes the sockets."""

    name = "dhcp"

    @dataclasses.dataclass(frozen=True)
    class Options:
        port: int = wire.SERVER_PORT
        vc_networks: bool = True     # serve the VC bridges here too
        # SO_RCVBUF bytes (the kernel doubles it); 0: the kernel's default.
        receive_buffer: int = RECEIVE_BUFFER

        def __post_init__(self) -> None:
            check_port(self.port)
            if self.receive_buffer < 0:
                raise ValueError("receive_buffer must be 0 (the kernel's default) or more")

    def __init__(self, replica: Replica, cluster: Cluster, options: Options | None = None):
        super().__init__(replica, cluster, options)
        self.options: DhcpService.Options
        self.discovered: dict[str, str] = {}
        self.transactions = balance.Transactions()
        self.responder = Responder(cluster, replica, self.counters, self._log_events(),
                                   self.discovered, transactions=self.transactions)
        # By interface: None is the replica's own, the others VC bridges.
        self._socks: dict[str | None, socket.socket] = {}
        self._threads: dict[str | None, threading.Thread] = {}
        self._lock = threading.Lock()
        # Reply destinations as the sockaddr_in that sendmmsg takes, made once each.
        self._peers: dict[tuple[str, int], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._malformed_logged: set[str] = set()
        self.links = LinkFollower(self._links_changed, self.counters)

    @staticmethod
    def _log_events() -> bool:
        return log.isEnabledFor(logging.INFO)

    def _open(self, interface: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            set_receive_buffer(sock, self.options.receive_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        return sock

    def _listen(self, key: str | None, sock: socket.socket) -> None:
        self._socks[key] = sock
        thread = threading.Thread(target=self._serve, args=(sock, key), daemon=True,
                                  name=f"dhcp-{key or self.replica.interface}")
        self._threads[key] = thread
        thread.start()

    def _close(self, key: str | None) -> None:
        sock = self._socks.pop(key, None)
        thread = self._threads.pop(key, None)
        if sock is None:
            return
        try:    # ends the thread's blocking recvmmsg (Linux, also for UDP)
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        if thread is not None:
            thread.join(JOIN_S)
        sock.close()

    async def start(self) -> None:
        sock = self._open(self.replica.interface, self.options.port)
        self.port = sock.getsockname()[1]   # port 0 in a test: the one we got
        self._loop = asyncio.get_running_loop()
        self._listen(None, sock)
        log.info("dhcp listening on %s:%d (%s), gen %d", self.replica.interface, self.port,
                 self.replica.address, self.cluster.generation)
        if self.responder.local is None:
            log.warning("%s is on no network this replica serves: only relayed requests will "
                        "be answered", self.replica.address)
        if self.options.vc_networks:
            try:
                await self.links.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        await self.links.stop()
        for key in list(self._socks):
            self._close(key)

    def reload(self, cluster: Cluster) -> None:
        # Build the whole new responder first, then swap: a packet sees one generation or
        # the other, never a mix.
        responder = Responder(cluster, self.replica, self.counters, self._log_events(),
                              self.discovered, self.responder, self.transactions)
        self.responder = responder
        super().reload(cluster)
        self._links_changed(self.links.present)

    def _links_changed(self, present: Present) -> None:
        """Open a socket on each VC bridge that is here with its service address and is in
        this generation; close those that are not any more."""
        if self._loop is None:
            return
        networks = self.responder.by_interface
        wanted = {served.bridge for served in served_here(vc_interfaces(self.cluster), present)
                  if served.bridge in networks}
        for bridge in sorted(key for key in self._socks if key is not None and key not in wanted):
            self._close(bridge)
            log.info("dhcp no longer on %s", bridge)
        for bridge in sorted(wanted - set(self._socks)):
            try:
                self._listen(bridge, self._open(bridge, self.port or self.options.port))
            except OSError as err:     # gone again meanwhile: the next event tells
                self.counters["vc_listen_errors"] += 1
                log.warning("dhcp cannot listen on %s: %s", bridge, err)
                continue
            log.info("dhcp on %s for the %s network (server %s)", bridge,
                     networks[bridge].name, networks[bridge].server)

    def details(self) -> dict[str, object]:
        """Unknown MACs answered from the discovery pool, for `vlx bootsvc discovered`; the
        VC bridges served here."""
        details: dict[str, object] = {}
        if self.discovered:
            details[DISCOVERED] = dict(sorted(self.discovered.items()))
        bridges = sorted(key for key in self._socks if key is not None)
        if bridges:
            details[VC_INTERFACES] = bridges
        return details

    def _serve(self, sock: socket.socket, interface: str | None) -> None:
        """The thread of one socket, until `_close` has taken the socket away and shut it
        down. Never raises: a datagram that breaks something is counted, logged once, and
        dropped.

        Two ways to read, by how much is queued: below saturation each request comes alone,
        and one blocking recvfrom_into and one sendto per datagram cost least (a recvmmsg and
        a sendmmsg through ctypes for a batch of one cost ~5 us more per datagram here);
        under load, one recvmmsg takes up to BATCH queued requests and one sendmmsg sends
        their replies. A batch of one switches to single reads; after SINGLES of those, one
        recvmmsg looks at the queue again."""
        batch = open_batch(sock, BATCH, MAX_DATAGRAM)
        counters, lock = self.counters, self._lock
        buffer = bytearray(MAX_DATAGRAM)
        view = memoryview(buffer)
        read_one = sock.recvfrom_into
        truncated = left = 0
        while True:
            try:
                if left:
                    left -= 1
                    size, source = read_one(buffer, 0, MSG_TRUNC)
                    if not size and self._socks.get(interface) is not sock:
                        return      # shut down by _close
                    with lock:
                        if size > MAX_DATAGRAM:
                            counters["dropped_oversized"] += 1
                            continue
                        try:
                            self.handle(bytes(view[:size]), source, interface)
                        except Exception:       # a bug, not the client's
                            self._internal_error(source)
                    continue
                datagrams, peers = batch.receive()
                if len(datagrams) == 1:
                    left = SINGLES
            except OSError as err:
                if self._socks.get(interface) is not sock:
                    return
                with lock:
                    counters["receive_errors"] += 1
                log.debug("dhcp receive error: %s", err)
                continue
            if self._socks.get(interface) is not sock:
                return
            if batch.truncated != truncated:     # (a batch of only those is empty)
                with lock:
                    counters["dropped_oversized"] += batch.truncated - truncated
                truncated = batch.truncated
            if not datagrams:
                continue
            with lock:
                replies, destinations = self._answer_batch(datagrams, peers, interface)
                if replies:
                    send_counted(batch, replies, destinations, counters)

    def _answer_batch(self, datagrams: list[bytes], peers: list[bytes],
                      interface: str | None) -> tuple[list[bytes], list[bytes]]:
        """The replies to a batch, each with its destination's sockaddr_in."""
        responder = self.responder      # one generation for the whole batch
        replies: list[bytes] = []
        destinations: list[bytes] = []
        for data, peer in zip(datagrams, peers, strict=True):
            try:
                reply = responder.respond(data, interface)
            except wire.MalformedPacket as err:
                self._malformed(err, peer_address(peer))
                continue
            except Exception:       # a bug, not the client's: keep serving the others
                self._internal_error(peer_address(peer))
                continue
            if reply is not None:
                replies.append(reply.data)
                key = (reply.address, reply.port)
                destination = self._peers.get(key)
                if destination is None:
                    if len(self._peers) >= LOG_ONCE_LIMIT:
                        self._peers.clear()
                    destination = self._peers[key] = peer_of(key)
                destinations.append(destination)
        return replies, destinations

    def handle(self, data: bytes, source: tuple[str, int],
               interface: str | None = None) -> Reply | None:
        """Answer one datagram from `source` that arrived on `interface` (None: the
        replica's own): the reply sent (None: none, or not started). A socket's thread
        answers its single reads here and its batches in `_answer_batch`."""
        try:
            reply = self.responder.respond(data, interface)
        except wire.MalformedPacket as err:
            self._malformed(err, source)
            return None
        sock = self._socks.get(interface)
        if reply is not None and sock is not None:
            try:
                sock.sendto(reply.data, socket.MSG_DONTWAIT, (reply.address, reply.port))
            except BlockingIOError:
                self.counters["dropped_send_buffer_full"] += 1
            except OSError as err:
                # A relay or client that cannot be reached: count it and keep serving.
                self.counters["send_errors"] += 1
                log.debug("dhcp send to %s failed: %s", reply.address, err)
        return reply

    def _malformed(self, err: wire.MalformedPacket, source: tuple[str, int]) -> None:
        self.counters["dropped_" + err.reason] += 1
        host = source[0]
        if host not in self._malformed_logged and len(self._malformed_logged) < LOG_ONCE_LIMIT:
            self._malformed_logged.add(host)
            log.warning("dropped a malformed packet from %s:%d: %s (further ones from "
                        "there are only counted)", host, source[1], err)

    def _internal_error(self, source: tuple[str, int]) -> None:
        self.counters["internal_error"] += 1
        host = source[0]
        if host not in self._malformed_logged and len(self._malformed_logged) < LOG_ONCE_LIMIT:
            self._malformed_logged.add(host)
            log.exception("internal error answering %s:%d (further ones from there are only "
                          "counted)", host, source[1])


def discovered(status: Status) -> dict[str, str]:
    """The unknown MACs a replica answered from the discovery pool (MAC -> pool address),
    as its status reports them."""
    return dict(status.details(DhcpService.name).get(DISCOVERED, {}))


SERVICE = DhcpService

"""The DHCP service: answers computed from (database generation, request) alone.

Which networks a replica answers for, and who is on each, is `dhcp_networks.served_networks`.
A datagram is answered from the network of the interface it arrived on: a MAC known on another
network (a VM of VC green on tan's bridge or on the cluster network, a node on a VC bridge) is
counted as `ignored_wrong_network` and logged once.
A `Responder` holds one generation's answers for one replica: each host's OFFER/ACK (per boot
file) is built by `dhcp_wire.encode` the first time it is asked for and kept for the
generation, which also keeps a reload of a 10,000-node cluster quick; the hot path parses a few
fields and joins the kept pieces of the host's answer with the request's xid, flags, ciaddr,
giaddr and chaddr, and option 82 if a relay sent one. Which replicas answer a client's
broadcast at all is `balance`'s decision (RFC 3074 load balancing over the nodes). Unknown
MACs are counted and logged once, and get no answer unless the cluster has a
`discovery_pool`: then each gets the pool address its MAC hashes to (the same on every
replica, no lease state) and is remembered in `discovered` for the metamaster to adopt.
`DhcpService` binds UDP 67 on the replica's interface, and one more socket per VC bridge here
(`vc_links` follows them through netlink), each with SO_BINDTODEVICE: the arriving interface
is the socket's, a broadcast reply leaves by it without per-packet control messages, and each
network has its own receive buffer, so a VM flooding its bridge cannot crowd out the nodes'
boots on the cluster network (one socket with IP_PKTINFO would share one buffer and receive on
interfaces we do not serve).
Imports the model, `netboot.layout`, `balance`, `dhcp_networks`, `dhcp_wire` and `vc_links`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections import Counter
from typing import NamedTuple

from virtualinux.netboot import layout
from virtualinux.vvcm import Cluster

from . import balance
from . import dhcp_wire as wire
from .dhcp_networks import Host, Network, served_networks
from .service import Replica, Service, check_port, set_receive_buffer
from .status import Status
from .vc_links import LinkFollower, Present, served_here, vc_interfaces

log = logging.getLogger(__name__)

ZERO = bytes(4)
BROADCAST = "255.255.255.255"
# Bounds on what we remember only to avoid repeating a log line.
LOG_ONCE_LIMIT = 4096
# Room for a burst of DORA from a rack powering on at once.
RECEIVE_BUFFER = 4 << 20
# Datagrams read per wake-up of the event loop before others get a turn.
DRAIN_BATCH = 64
# Bigger than any DHCP message (RFC 2131 allows up to the client's option 57, at most 64 KiB
# in UDP); a datagram cut at this size is dropped, not parsed.
MAX_DATAGRAM = 65535
# A plain int: `flags & socket.MSG_TRUNC` goes through enum.Flag.__and__, ~5 us a datagram
# (half the receive path's cost; measured with recvmsg on loopback, py-spy showed it too).
MSG_TRUNC = int(socket.MSG_TRUNC)
# The key of details() under which the discovery pool's answers are reported.
DISCOVERED = "discovered"
OPT_DOMAIN_SEARCH = 119         # RFC 3397
# The key of details() listing the VC bridges served here.
VC_INTERFACES = "vc_interfaces"


def domain_search(*domains: str) -> bytes:
    """Option 119's value (RFC 3397): the names in DNS wire form, uncompressed."""
    return b"".join(b"".join(bytes((len(label),)) + label.encode()
                             for label in domain.split(".") if label) + b"\0"
                    for domain in domains)


class Reply(NamedTuple):
    data: bytes
    address: str
    port: int


SECS = bytes(2)
END = bytes((wire.OPT_END,))


class Template(NamedTuple):
    """One host's encoded answer of one kind, in the pieces that lie between the fields
    copied from each request."""

    op: bytes                   # op, htype, hlen, hops
    yiaddr_siaddr: bytes
    rest: bytes                 # from the end of chaddr up to the options after the host's
    tail: bytes                 # OPT_END and the padding to MIN_REPLY_LEN

    @classmethod
    def split(cls, prefix: bytes, tail: bytes) -> Template:
        return cls(prefix[:wire.XID.start], prefix[wire.YIADDR.start:wire.SIADDR.stop],
                   prefix[wire.CHADDR.stop:], tail)


class Responder:
    """One generation's answers for one replica; `respond` is the per-packet hot path."""

    def __init__(self, cluster: Cluster, replica: Replica, counters: Counter[str],
                 log_events: bool = True, discovered: dict[str, str] | None = None,
                 previous: Responder | None = None,
                 transactions: balance.Transactions | None = None):
        self.generation = cluster.generation
        self.counters = counters
        # MAC -> pool address of unknown machines seen; kept across generations by the service.
        self.discovered = discovered if discovered is not None else {}
        self.log_events = log_events
        self.server_id = replica.address.packed
        self.networks = served_networks(cluster)
        self.local = next((net for net in self.networks
                           if net.interface is None and replica.address in net.cidr), None)
        self.by_interface = {net.interface: net for net in self.networks if net.interface}
        # Where each known MAC belongs, to say why one asking on another network is ignored.
        self._home = {mac: net.name for net in self.networks for mac in net.hosts}
        # Only the cluster network is balanced: a VC's broadcasts reach just its hosting
        # nodes, and they answer the same.
        self.balancer: balance.Balancer | None = balance.for_replica(
            cluster, replica.node.name if replica.node else None,
            (mac for net in self.networks if net.interface is None for mac in net.hosts),
            previous.balancer if previous else None, transactions)
        scheme = "http" if "http" in replica.services else "tftp"
        self.ipxe_url = f"{scheme}://{replica.address}/{layout.IPXE_SCRIPT}"
        self._replica_address = replica.address
        # (MAC, kind, boot file) -> the answer's fixed pieces around the request's fields.
        self._templates: dict[tuple[bytes, int, str | None], Template] = {}
        # A host's address, MAC and its options (DNS, domain, name), by (network, MAC).
        self._host_parts: dict[tuple[str, bytes], tuple[bytes, bytes, bytes]] = {}
        self._shared: dict[tuple[str, int, str | None], tuple[bytes, bytes, bytes, bytes]] = {}
        self._relay_networks: dict[bytes, Network | None] = {}
        self._unknown_logged: set[bytes] = set()
        self._wrong_logged: set[tuple[bytes, str]] = set()

    @property
    def cached_answers(self) -> int:
        """How many encoded answers are kept for reuse (only known hosts get one)."""
        return len(self._templates)

    def respond(self, data: bytes, interface: str | None = None) -> Reply | None:
        """The answer to one datagram that arrived on `interface` (None: the replica's own),
        or None; raises `wire.MalformedPacket` for garbage."""
        request = wire.parse_request(data)
        kind = request.message_type
        self.counters[wire.MESSAGE_TYPE_NAMES[kind]] += 1
        if interface is None:
            network = self._network(request.giaddr)
        elif request.giaddr != ZERO:
            self.counters["ignored_relayed_on_vc_network"] += 1   # VC networks have no relays
            return None
        else:
            network = self.by_interface.get(interface)
        if network is None:
            self.counters["ignored_no_network"] += 1
            return None
        host = network.hosts.get(request.mac)
        cache = True
        if host is None:
            home = self._home.get(request.mac)
            if home is not None:
                self._wrong_network(request, network, home)
                return None
            host = network.pool_host(request.mac)
            if host is None:
                self._unknown(request)
                return None
            self._discovered(request, host)
            cache = False   # a flood of made-up MACs must not grow the template cache
        # RFC 3074: a broadcast from a client looking for any server (DISCOVER, INIT-REBOOT)
        # is answered by the replicas its hash picks. A relayed request, a REQUEST naming a
        # server (decided below) and a client that has an address (renewing, rebinding,
        # INFORM) are answered as without balancing.
        if (self.balancer is not None and network.interface is None
                and request.giaddr == ZERO and request.ciaddr == ZERO
                and request.server_id is None
                and (kind == wire.DISCOVER or kind == wire.REQUEST)
                and not self.balancer.decide(balance.client_key(request.mac, request.client_id),
                                             request.secs, request.xid, request.mac,
                                             self.counters)):
            return None
        if kind == wire.DISCOVER:
            return self._answer(request, network, host, wire.OFFER, cache)
        if kind == wire.REQUEST:
            return self._request(request, network, host, cache)
        if kind == wire.INFORM:
            return self._answer(request, network, host, wire.INFORM, cache)
        if kind == wire.RELEASE:
            self._event("DHCPRELEASE", request, host, logging.INFO)
        elif kind == wire.DECLINE:
            # With a fixed map there is no other address to offer: somebody else holds this one.
            self._event("DHCPDECLINE", request, host, logging.WARNING,
                        " (the address is in use by another machine: fix the network)")
        else:
            self.counters["ignored_server_message"] += 1
        return None

    def _request(self, request: wire.Request, network: Network, host: Host,
                 cache: bool = True) -> Reply | None:
        mine = host.ip.packed
        if request.server_id is not None:                       # SELECTING
            if request.server_id != self._server_id(network):
                self.counters["ignored_other_server"] += 1
                return None
            wanted = request.requested_ip
        elif request.requested_ip is not None:                  # INIT-REBOOT
            wanted = request.requested_ip
        elif request.ciaddr != ZERO:                            # RENEWING or REBINDING
            wanted = request.ciaddr
        else:
            wanted = None
        if wanted is None:      # (a SELECTING one must name the address: RFC 2131 4.3.2)
            self.counters["ignored_request_without_address"] += 1
            return None
        if wanted != mine:
            return self._nak(request, network, host, wanted)
        return self._answer(request, network, host, wire.ACK, cache)

    def _answer(self, request: wire.Request, network: Network, host: Host,
                kind: int, cache: bool = True) -> Reply:
        bootfile = self._bootfile(request) if network.interface is None else None
        key = (request.mac, kind, bootfile)
        template = self._templates.get(key)
        if template is None:
            template = Template.split(*self._build(network, host, kind, bootfile, cache))
            if cache:
                self._templates[key] = template
        # One join of the kept pieces and the request's own fields (xid, flags, ciaddr but in
        # an OFFER, giaddr, chaddr): no copy of the whole answer to patch in place.
        pieces = (template.op, request.xid, SECS, request.flags,
                  ZERO if kind == wire.OFFER else request.ciaddr, template.yiaddr_siaddr,
                  request.giaddr, request.chaddr, template.rest)
        if request.relay_agent is not None:
            packet = b"".join((*pieces, request.relay_agent, END)).ljust(
                wire.MIN_REPLY_LEN, b"\0")
        else:
            packet = b"".join((*pieces, template.tail))
        name = "DHCPOFFER" if kind == wire.OFFER else "DHCPACK"
        self.counters[name] += 1
        if self.log_events:
            self._event(name, request, host, logging.INFO)
        return Reply(packet, *self._destination(request, nak=False))

    def _nak(self, request: wire.Request, network: Network, host: Host,
             wanted: bytes) -> Reply:
        options = [(wire.OPT_MESSAGE_TYPE, bytes([wire.NAK])),
                   (wire.OPT_SERVER_ID, self._server_id(network))]
        flags = int.from_bytes(request.flags, "big")
        if request.giaddr != ZERO:
            flags |= wire.BROADCAST_FLAG   # RFC 2131 4.3.2: the relay broadcasts a NAK
        message = wire.Message(op=wire.BOOTREPLY, xid=int.from_bytes(request.xid, "big"),
                               chaddr=request.chaddr, options=tuple(options), flags=flags,
                               giaddr=ipaddress.IPv4Address(request.giaddr))
        packet = wire.encode(message, pad_to=0)
        if request.relay_agent is not None:
            packet = packet[:-1] + request.relay_agent + bytes([wire.OPT_END])
        packet = packet.ljust(wire.MIN_REPLY_LEN, b"\0")
        self.counters["DHCPNAK"] += 1
        self._event("DHCPNAK", request, host, logging.INFO,
                    f" (asked for {ipaddress.IPv4Address(wanted)})")
        return Reply(packet, *self._destination(request, nak=True))

    def _destination(self, request: wire.Request, nak: bool) -> tuple[str, int]:
        """RFC 2131 4.1: to the relay; else unicast to a client that has its address; else
        broadcast (a client without an address cannot take unicast before it has ARP, and
        broadcast works for dhclient, udhcpc and iPXE alike)."""
        if request.giaddr != ZERO:
            return socket.inet_ntoa(request.giaddr), wire.SERVER_PORT
        if request.ciaddr != ZERO and not nak:
            return socket.inet_ntoa(request.ciaddr), wire.CLIENT_PORT
        return BROADCAST, wire.CLIENT_PORT

    def _bootfile(self, request: wire.Request) -> str | None:
        if request.is_ipxe:
            # Already iPXE: hand it the script, or it would chainload iPXE forever.
            return self.ipxe_url
        if request.client_arch is None:
            return None
        bootfile = layout.ARCH_BOOTFILES.get(request.client_arch)
        if bootfile is None:
            self.counters["unknown_client_arch"] += 1
        return bootfile

    def _build(self, network: Network, host: Host, kind: int, bootfile: str | None,
               cache: bool = True) -> tuple[bytes, bytes]:
        """One host's answer, without xid and the other per-request fields (patched later):
        the network's shared pieces with the host's address, MAC, DNS servers and name put
        in. Every host's first answer is built here (a cold start of 10,000 nodes builds
        10,000), so nothing is encoded twice: splicing is ~10x cheaper than encoding, and the
        host's own pieces are kept for its next kind of answer (a DISCOVER's OFFER, then the
        REQUEST's ACK)."""
        key = (network.name, kind, bootfile)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = self._shared_parts(network, kind, bootfile)
        header, head, domain, tail = shared
        host_key = (network.name, host.mac)
        parts = self._host_parts.get(host_key)
        if parts is None:
            dns = (wire.encode_options(((wire.OPT_DNS, wire.addresses(host.dns)),))
                   if host.dns else b"")
            name = wire.encode_options(((wire.OPT_HOST_NAME, host.name.encode()),))
            parts = (host.ip.packed, host.mac.ljust(16, b"\0"), dns + domain + name)
            if cache:
                self._host_parts[host_key] = parts
        address, chaddr, options = parts
        if kind == wire.INFORM:
            address = header[wire.YIADDR]
        prefix = b"".join((header[:wire.YIADDR.start], address,
                           header[wire.YIADDR.stop:wire.CHADDR.start], chaddr,
                           header[wire.CHADDR.stop:], head, options, tail))
        # Without OPT_END: option 82 goes before it.
        end = bytes((wire.OPT_END,))
        return prefix, end.ljust(wire.MIN_REPLY_LEN - len(prefix), b"\0")

    def _shared_parts(self, network: Network, kind: int,
                      bootfile: str | None) -> tuple[bytes, bytes, bytes, bytes]:
        """What every host's answer of one kind on `network` has in common: the fixed header
        with the magic cookie, the options before the host's DNS servers, the domain (between
        DNS and the host name), and the options after the host name."""
        head: list[tuple[int, bytes]] = [
            (wire.OPT_MESSAGE_TYPE, bytes([wire.ACK if kind == wire.INFORM else kind])),
            (wire.OPT_SERVER_ID, self._server_id(network))]
        if kind != wire.INFORM:   # RFC 2131 4.3.5: no lease times in an answer to INFORM
            lease = network.lease_time
            head += [(wire.OPT_LEASE_TIME, wire.u32(lease)),
                     (wire.OPT_RENEWAL_TIME, wire.u32(lease // 2)),
                     (wire.OPT_REBINDING_TIME, wire.u32(lease * 7 // 8))]
        head += [(wire.OPT_SUBNET_MASK, network.cidr.netmask.packed),
                 (wire.OPT_BROADCAST, network.cidr.broadcast_address.packed)]
        if network.router is not None:
            head.append((wire.OPT_ROUTER, network.router.packed))
        tail: list[tuple[int, bytes]] = []
        if network.interface is not None:   # VMs look up each other by short name
            tail.append((OPT_DOMAIN_SEARCH, domain_search(network.domain)))
        if network.ntp:
            tail.append((wire.OPT_NTP, wire.addresses(network.ntp)))
        siaddr = ipaddress.IPv4Address(0)
        if bootfile is not None:
            siaddr = self._replica_address
            tail += [(wire.OPT_TFTP_SERVER, str(self._replica_address).encode()),
                     (wire.OPT_BOOTFILE, bootfile.encode())]
        header = wire.encode(wire.Message(op=wire.BOOTREPLY, xid=0, chaddr=b"", options=(),
                                          siaddr=siaddr,
                                          file=bootfile.encode() if bootfile else b""),
                             pad_to=0)[:wire.OPTIONS_START]
        return (header, wire.encode_options(head),
                wire.encode_options(((wire.OPT_DOMAIN_NAME, network.domain.encode()),)),
                wire.encode_options(tail))

    def _server_id(self, network: Network) -> bytes:
        return network.server.packed if network.server is not None else self.server_id

    def _network(self, giaddr: bytes) -> Network | None:
        if giaddr == ZERO:
            return self.local
        if giaddr not in self._relay_networks:
            if len(self._relay_networks) >= LOG_ONCE_LIMIT:
                self._relay_networks.clear()
            self._relay_networks[giaddr] = next(
                (net for net in self.networks if net.interface is None and net.contains(giaddr)),
                None)
        return self._relay_networks[giaddr]

    def _wrong_network(self, request: wire.Request, network: Network, home: str) -> None:
        self.counters["ignored_wrong_network"] += 1
        key = (request.mac, network.name)
        if key not in self._wrong_logged and len(self._wrong_logged) < LOG_ONCE_LIMIT:
            self._wrong_logged.add(key)
            log.warning("%s from %s on the %s network, but it belongs to the %s network: no "
                        "answer (gen %d)", wire.MESSAGE_TYPE_NAMES[request.message_type],
                        request.mac_text(), network.name, home, self.generation)

    def _discovered(self, request: wire.Request, host: Host) -> None:
        self.counters["discovery_pool_answers"] += 1
        mac = request.mac_text()
        if mac not in self.discovered and len(self.discovered) < LOG_ONCE_LIMIT:
            self.discovered[mac] = str(host.ip)
            log.info("DISCOVERED %s: unknown MAC, offered pool address %s (gen %d)", mac,
                     host.ip, self.generation)

    def _unknown(self, request: wire.Request) -> None:
        self.counters["ignored_unknown_mac"] += 1
        if request.mac not in self._unknown_logged and len(self._unknown_logged) < LOG_ONCE_LIMIT:
            self._unknown_logged.add(request.mac)
            log.info("%s from unknown MAC %s: no answer (gen %d)",
                     wire.MESSAGE_TYPE_NAMES[request.message_type], request.mac_text(),
                     self.generation)

    def _event(self, name: str, request: wire.Request, host: Host, level: int,
               note: str = "") -> None:
        if self.log_events or level > logging.INFO:
            log.log(level, "%s %s -> %s %s (gen %d)%s", name, request.mac_text(), host.ip,
                    host.name, self.generation, note)


class DhcpService(Service):
    """UDP 67 on the replica's interface and on each VC bridge here. Each socket is drained in
    batches from the event loop's reader callback: under load one wake-up serves many
    datagrams."""

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
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _listen(self, key: str | None, sock: socket.socket) -> None:
        self._socks[key] = sock
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._drain, sock, key)

    def _close(self, key: str | None) -> None:
        sock = self._socks.pop(key, None)
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
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

    def _drain(self, sock: socket.socket, interface: str | None) -> None:
        if self._socks.get(interface) is not sock:   # closed between the wake-up and now
            return
        for _ in range(DRAIN_BATCH):
            try:
                data, _, flags, source = sock.recvmsg(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as err:
                self.counters["receive_errors"] += 1
                log.debug("dhcp receive error: %s", err)
                return
            if flags & MSG_TRUNC:
                self.counters["dropped_oversized"] += 1
                continue
            self.handle(data, source, interface)

    def handle(self, data: bytes, source: tuple[str, int],
               interface: str | None = None) -> Reply | None:
        """Answer one datagram from `source` that arrived on `interface` (None: the
        replica's own): the reply sent (None: none, or not started)."""
        try:
            reply = self.responder.respond(data, interface)
        except wire.MalformedPacket as err:
            self.counters["dropped_" + err.reason] += 1
            host = source[0]
            if host not in self._malformed_logged and len(
                    self._malformed_logged) < LOG_ONCE_LIMIT:
                self._malformed_logged.add(host)
                log.warning("dropped a malformed packet from %s:%d: %s (further ones from "
                            "there are only counted)", host, source[1], err)
            return None
        sock = self._socks.get(interface)
        if reply is not None and sock is not None:
            try:
                sock.sendto(reply.data, (reply.address, reply.port))
            except BlockingIOError:
                self.counters["dropped_send_buffer_full"] += 1
            except OSError as err:
                # A relay or client that cannot be reached: count it and keep serving.
                self.counters["send_errors"] += 1
                log.debug("dhcp send to %s failed: %s", reply.address, err)
        return reply


def discovered(status: Status) -> dict[str, str]:
    """The unknown MACs a replica answered from the discovery pool (MAC -> pool address),
    as its status reports them."""
    return dict(status.details(DhcpService.name).get(DISCOVERED, {}))


SERVICE = DhcpService

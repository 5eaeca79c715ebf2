"""What a DHCP replica answers: `Responder`, one generation's answers for one replica, computed
from (database generation, request) alone, and `Reply`, an answer with where it goes.

Which networks a replica answers for, and who is on each, is `dhcp_networks.served_networks`.
A datagram is answered from the network of the interface it arrived on: a MAC known on another
network (a VM of VC green on tan's bridge or on the cluster network, a node on a VC bridge) is
counted as `ignored_wrong_network` and logged once. An answer is one join of pieces made
before any request: each host's address and own options (DNS servers, domain, name), encoded
when the generation loads, and what every host's answer of one kind and boot file on a network
shares, encoded on its first use; the request gives xid, flags, ciaddr, giaddr and chaddr, and
option 82 if a relay sent one. So a rack's first power-on, when each host asks once or twice,
is answered as fast as renewals are. Which replicas answer a client's broadcast at all is
`balance`'s decision (RFC 3074 load balancing over the nodes). Unknown MACs are counted and
logged once, and get no answer unless the cluster has a `discovery_pool`: then each gets the
pool address its MAC hashes to (the same on every replica, no lease state) and is remembered
in `discovered` for the metamaster to adopt.
No sockets here: `dhcp.DhcpService` reads the datagrams and sends the replies. Imports the
model, `netboot.layout`, `balance`, `dhcp_networks` and `dhcp_wire`.
"""

from __future__ import annotations

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
from .service import Replica

log = logging.getLogger(__name__)

ZERO = bytes(4)
BROADCAST = "255.255.255.255"
# Bounds on what we remember only to avoid repeating a log line.
LOG_ONCE_LIMIT = 4096
OPT_DOMAIN_SEARCH = 119         # RFC 3397


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
# END and the zeros after it that bring an answer up to MIN_REPLY_LEN, by how many zeros.
PADDING = tuple(END + bytes(zeros) for zeros in range(wire.MIN_REPLY_LEN))


class Shared(NamedTuple):
    """What every host's answer of one kind and boot file on one network has, in the pieces
    between the fields that come from the request and from the host."""

    op: bytes                   # op, htype, hlen, hops
    siaddr: bytes
    middle: bytes               # sname, file, magic cookie, the options before the host's
    after: bytes                # the options after the host's, without OPT_END
    room: int                   # the zeros after OPT_END when the host has no options


class HostParts(NamedTuple):
    address: bytes
    options: bytes              # DNS servers, domain, host name


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
        # (network, kind, boot file) -> the pieces every host's answer shares.
        self._shared: dict[tuple[str, int, str | None], Shared] = {}
        # Network -> MAC -> the host's own pieces, for every known host before any request.
        self._host_parts = {net.name: {mac: self._encode_host(net, host)
                                       for mac, host in net.hosts.items()}
                            for net in self.networks}
        self._relay_networks: dict[bytes, Network | None] = {}
        self._unknown_logged: set[bytes] = set()
        self._wrong_logged: set[tuple[bytes, str]] = set()

    @property
    def encoded_hosts(self) -> int:
        """How many hosts' own answer pieces are kept (every known host's, no others)."""
        return sum(map(len, self._host_parts.values()))

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
        if host is not None:
            parts = self._host_parts[network.name][request.mac]
        else:
            home = self._home.get(request.mac)
            if home is not None:
                self._wrong_network(request, network, home)
                return None
            host = network.pool_host(request.mac)
            if host is None:
                self._unknown(request)
                return None
            self._discovered(request, host)
            # Encoded per answer and not kept: a flood of made-up MACs must not grow memory.
            parts = self._encode_host(network, host)
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
            return self._answer(request, network, host, parts, wire.OFFER)
        if kind == wire.REQUEST:
            return self._request(request, network, host, parts)
        if kind == wire.INFORM:
            return self._answer(request, network, host, parts, wire.INFORM)
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
                 parts: HostParts) -> Reply | None:
        mine = parts.address
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
        return self._answer(request, network, host, parts, wire.ACK)

    def _answer(self, request: wire.Request, network: Network, host: Host, parts: HostParts,
                kind: int) -> Reply:
        bootfile = self._bootfile(request) if network.interface is None else None
        key = (network.name, kind, bootfile)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = self._shared_parts(network, kind, bootfile)
        packet = self._join(shared, parts, kind, request.xid, request.flags, request.ciaddr,
                            request.giaddr, request.chaddr, request.relay_agent)
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

    @staticmethod
    def _join(shared: Shared, parts: HostParts, kind: int, xid: bytes, flags: bytes,
              ciaddr: bytes, giaddr: bytes, chaddr: bytes, relay_agent: bytes | None) -> bytes:
        """One answer: a single join of the shared pieces, the host's, and the request's
        own fields (no copy of a whole answer to patch in place)."""
        pieces = (shared.op, xid, SECS, flags, ZERO if kind == wire.OFFER else ciaddr,
                  ZERO if kind == wire.INFORM else parts.address, shared.siaddr, giaddr,
                  chaddr, shared.middle, parts.options, shared.after)
        if relay_agent is not None:    # option 82 goes back before OPT_END
            return b"".join((*pieces, relay_agent, END)).ljust(wire.MIN_REPLY_LEN, b"\0")
        zeros = shared.room - len(parts.options)
        return b"".join((*pieces, PADDING[zeros] if zeros > 0 else END))

    @staticmethod
    def _encode_host(network: Network, host: Host) -> HostParts:
        """A host's own pieces of its answers: address, DNS servers, domain and name (every
        host's at each generation: ~2 us each, 20 ms for 10,000)."""
        return HostParts(host.ip.packed, b"".join((
            wire.encode_option(wire.OPT_DNS, wire.addresses(host.dns)) if host.dns else b"",
            wire.encode_option(wire.OPT_DOMAIN_NAME, network.domain.encode()),
            wire.encode_option(wire.OPT_HOST_NAME, host.name.encode()))))

    def _shared_parts(self, network: Network, kind: int, bootfile: str | None) -> Shared:
        """What every host's answer of one kind on `network` has in common: the fixed header
        with the magic cookie, the options before the host's and those after them."""
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
        middle = header[wire.CHADDR.stop:] + wire.encode_options(head)
        after = wire.encode_options(tail)
        # Everything but the host's options and the zeros: header, options, OPT_END.
        length = wire.CHADDR.stop + len(middle) + len(after) + 1
        return Shared(header[:wire.XID.start], header[wire.SIADDR], middle, after,
                      wire.MIN_REPLY_LEN - length)

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

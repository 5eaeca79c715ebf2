"""What a DHCP replica answers: `Responder`, one generation's answers for one replica, computed
from (database generation, request) alone, and `Reply`, an answer with where it goes.

Which networks a replica answers for, and who is on each, is `dhcp_networks.served_networks`.
A datagram is answered from the network of the interface it arrived on: a MAC known on another
network (a VM of VC green on tan's bridge or on the cluster network, a node on a VC bridge) is
counted as `ignored_wrong_network` and logged once. Each host's OFFER/ACK (per boot file) is
built by `dhcp_wire.encode` the first time it is asked for and kept for the generation, which
also keeps a reload of a 10,000-node cluster quick; the hot path parses a few fields and joins
the kept pieces of the host's answer with the request's xid, flags, ciaddr, giaddr and chaddr,
and option 82 if a relay sent one. Which replicas answer a client's broadcast at all is
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

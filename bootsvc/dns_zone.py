"""The cluster's DNS zones from one database generation, as precomputed wire answers.

`ClusterZones(cluster)` holds everything a replica answers with authority:

- the cluster domain: every physical node `NODE.DOMAIN`, the gateway VIP `gateway.DOMAIN` (unless
  a node has that name), every VM in its VC's sub-domain `VM.VC.DOMAIN` (so `VC.DOMAIN` exists as
  an empty name: NODATA, not NXDOMAIN); SOA and NS at the apex;
- one reverse zone per octet-aligned block of the cluster network and of every VC network
  (a /23 gives two /24 zones; a /26 the /24 holding it), with PTR records, SOA and NS.

Every replica computes the same bytes: the NS set is the first `NS_COUNT` nodes of the database
(identical on every replica, and a resolver is happy with a few), the SOA serial is the
generation. `lookup(qname, qtype)` is one dict access for names that exist; for other names in
our zones it walks the name's suffixes to its zone and gives NODATA or NXDOMAIN with the SOA in
the authority section (RFC 2308); None means "not ours" and the caller forwards. AAAA and other
types of an existing name are NODATA. Used by the dns service and by `vlx dns lookup` (one
source of truth). Imports the model and `dns_wire`.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
from virtualinux.vvcm import Cluster

from . import dns_wire as wire
from .dns_wire import Body, Record, RecordEncoder

RECORD_TTL = 300          # cluster records change only with the database; resolvers re-ask soon
NEGATIVE_TTL = 60         # SOA minimum and TTL: a name added to the database shows within a minute
NS_COUNT = 4
GATEWAY_LABEL = "gateway"
HOSTMASTER = "hostmaster"
SOA_TIMERS = (3600, 600, 86400)      # refresh, retry, expire: no secondaries transfer from us
A, NS, SOA, PTR, ANY = (int(t) for t in (dns.rdatatype.A, dns.rdatatype.NS, dns.rdatatype.SOA,
                                         dns.rdatatype.PTR, dns.rdatatype.ANY))
IN = dns.rdataclass.IN


def reverse_zones(network: ipaddress.IPv4Network) -> list[dns.name.Name]:
    """The in-addr.arpa zones covering `network` exactly, on octet boundaries (at most 256;
    a network narrower than a /24 gets the /24 that holds it)."""
    prefix = network.prefixlen
    if prefix > 24:
        network, prefix = network.supernet(new_prefix=24), 24
    aligned = -(-prefix // 8) * 8
    blocks = [network] if aligned == prefix else list(network.subnets(new_prefix=aligned))
    names = []
    for block in blocks:
        octets = str(block.network_address).split(".")[: aligned // 8]
        names.append(dns.name.from_text(".".join(reversed(octets)) + ".in-addr.arpa."))
    return names


def ptr_wire(address: ipaddress.IPv4Address) -> bytes:
    return label_wire(*address.reverse_pointer.split(".")) + b"\0"


def label_wire(*labels: str) -> bytes:
    """The wire form of labels the model has checked (DNS labels: ASCII, 1-63 octets)."""
    return b"".join(bytes((len(label),)) + label.encode() for label in labels)


class ClusterZones:
    """One generation's authoritative answers, precomputed. Names are handled as wire bytes
    (lower-cased for keys): dnspython Name objects only where an rdata needs one."""

    def __init__(self, cluster: Cluster):
        self.generation = cluster.generation
        self.answers: dict[tuple[bytes, int], Body] = {}
        self.names: set[bytes] = set()                       # every name that exists
        self.zones: dict[bytes, tuple[Body, Body]] = {}      # apex -> (NODATA, NXDOMAIN)
        self.origins: list[dns.name.Name] = []
        settings = cluster.settings
        if settings is None:
            return
        domain = dns.name.from_text(settings.domain + ".")
        domain_wire = wire.wire_bytes(domain)
        records: dict[bytes, dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))

        def add(owner: bytes, rdata: dns.rdata.Rdata, ttl: int = RECORD_TTL) -> None:
            records[owner.lower()][int(rdata.rdtype)].append(Record(owner, ttl, rdata))

        def host(labels: tuple[str, ...], address: ipaddress.IPv4Address) -> dns.name.Name:
            name = dns.name.Name(labels + domain.labels)
            add(label_wire(*labels) + domain_wire,
                dns.rdtypes.IN.A.A(IN, dns.rdatatype.A, str(address)))
            add(ptr_wire(address), dns.rdtypes.ANY.PTR.PTR(IN, dns.rdatatype.PTR, name))
            return name

        for node in cluster.nodes:
            host((node.name,), node.ip)
        if GATEWAY_LABEL not in {node.name for node in cluster.nodes}:
            host((GATEWAY_LABEL,), settings.gateway_vip)
        for vm in cluster.vms:
            host((vm.name, vm.vc), vm.ip)

        servers = [dns.name.Name((node.name,) + domain.labels)
                   for node in cluster.nodes[:NS_COUNT]]
        if not servers:   # no node yet: the gateway name stands for the cluster's servers
            servers = [dns.name.Name((GATEWAY_LABEL,) + domain.labels)]
        soa = dns.rdtypes.ANY.SOA.SOA(
            IN, dns.rdatatype.SOA, servers[0], dns.name.Name((HOSTMASTER,) + domain.labels),
            cluster.generation % 2**32, *SOA_TIMERS, NEGATIVE_TTL)
        origins = [domain, *reverse_zones(settings.cidr)]
        for vc in cluster.vcs:
            origins.extend(reverse_zones(vc.cidr))
        for origin in dict.fromkeys(origins):      # in order, each once
            self.origins.append(origin)
            apex = wire.wire_bytes(origin)
            add(apex, soa, NEGATIVE_TTL)
            for server in servers:
                add(apex, dns.rdtypes.ANY.NS.NS(IN, dns.rdatatype.NS, server))
            self.zones[apex.lower()] = self._negative(Record(apex, NEGATIVE_TTL, soa))
        for key, by_type in records.items():
            self._add_name(key, by_type, records)

    def _add_name(self, key: bytes, by_type: dict[int, list[Record]],
                  records: dict[bytes, dict[int, list[Record]]]) -> None:
        self.names.add(key)
        position = key[0] + 1
        while key[position] and key[position:] not in self.names:
            self.names.add(key[position:])     # empty non-terminals answer NODATA
            position += key[position] + 1
        for qtype, found in by_type.items():
            encoder = RecordEncoder(key, qtype)
            answers = encoder.section(found)
            glue = encoder.section(self._glue(found, records)) if qtype == NS else None
            self.answers[key, qtype] = Body(wire.AA, answers.record_count, 0,
                                            glue.record_count if glue else 0, encoder.body())
        only = next(iter(by_type)) if len(by_type) == 1 else None
        if only is not None and not self.answers[key, only].additional:
            # The question's type does not change where its name sits: the same bytes.
            self.answers[key, ANY] = self.answers[key, only]
        else:
            self.answers[key, ANY] = self._any(key, by_type)

    @staticmethod
    def _any(key: bytes, by_type: dict[int, list[Record]]) -> Body:
        encoder = RecordEncoder(key, ANY)
        answers = encoder.section(r for found in by_type.values() for r in found)
        return Body(wire.AA, answers.record_count, 0, 0, encoder.body())

    @staticmethod
    def _glue(found: list[Record], records: dict[bytes, dict[int, list[Record]]]
              ) -> list[Record]:
        return [glue for record in found if isinstance(record.rdata, dns.rdtypes.ANY.NS.NS)
                for glue in records.get(wire.wire_bytes(record.rdata.target).lower(), {})
                .get(A, ())]

    @staticmethod
    def _negative(soa: Record) -> tuple[Body, Body]:
        # The SOA's owner is a suffix of the question name at an offset that differs per
        # name, so these bodies are encoded without compression and fit any question.
        encoder = RecordEncoder(None, 0)
        authority = encoder.section([soa])
        return (Body(wire.AA | wire.NOERROR, 0, authority.record_count, 0, encoder.body()),
                Body(wire.AA | wire.NXDOMAIN, 0, authority.record_count, 0, encoder.body()))

    def lookup(self, qname: bytes, qtype: int) -> Body | None:
        """The answer for a lower-cased wire name, or None when the name is in none of our
        zones (the caller forwards it)."""
        body = self.answers.get((qname, qtype))
        if body is not None:
            return body
        position = 0
        while True:
            zone = self.zones.get(qname[position:])
            if zone is not None:
                return zone[0] if qname in self.names else zone[1]
            length = qname[position]
            if length == 0:
                return None
            position += length + 1


def lookup_message(zones: ClusterZones, name: str, rdtype: str) -> dns.message.Message | None:
    """What a replica answers for NAME/TYPE (as a dnspython message), or None when the name
    is not in the cluster's zones: for `vlx dns lookup` and tests, through the same bytes."""
    query = dns.message.make_query(name, rdtype, use_edns=0)
    parsed = wire.parse_query(query.to_wire())
    body = zones.lookup(parsed.qname, parsed.qtype)
    if body is None:
        return None
    return dns.message.from_wire(wire.assemble(parsed, body, 65535))

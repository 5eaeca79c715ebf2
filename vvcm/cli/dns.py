"""`vlx dns lookup`: what every replica's DNS service answers for a name, computed from the
database with the service's own zone code (bootsvc.dns_zone), for debugging without a server."""

from __future__ import annotations

import argparse
import ipaddress

from ..errors import VlxError
from .common import add_json_flag, database, print_json


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("dns", help="the cluster's DNS as the replicas answer it",
                              description="Answer DNS questions from the database the way "
                                          "every replica's dns service does.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    lookup = verbs.add_parser("lookup", help="answer NAME from the database")
    lookup.add_argument("name", help="a name (node1.cluster.lab) or an IPv4 address (for PTR)")
    lookup.add_argument("--type", default=None, metavar="TYPE",
                        help="record type: A, PTR, SOA, NS, AAAA, ANY, ... (default A, or PTR "
                             "for an address)")
    add_json_flag(lookup)
    lookup.set_defaults(handler=cmd_lookup)


def cmd_lookup(args: argparse.Namespace) -> int:
    import dns.exception
    import dns.rcode
    import dns.rdatatype
    from virtualinux.bootsvc.dns_zone import ClusterZones, lookup_message

    name, rdtype = args.name, args.type
    try:
        address = ipaddress.IPv4Address(name)
    except ValueError:
        address = None
    if address is not None:
        name, rdtype = address.reverse_pointer, rdtype or "PTR"
    rdtype = (rdtype or "A").upper()
    try:
        dns.rdatatype.from_text(rdtype)
    except dns.exception.DNSException:
        raise VlxError(f"--type {rdtype}: not a DNS record type (A, PTR, SOA, NS, ...)") from None
    cluster = database(args).load()
    if cluster.settings is None:
        raise VlxError("the database has no cluster yet (vlx db import FILE first)")
    try:
        reply = lookup_message(ClusterZones(cluster), name, rdtype)
    except (dns.exception.DNSException, ValueError) as err:
        raise VlxError(f"{name!r}: not a DNS name ({err})") from None
    if reply is None:
        upstreams = ", ".join(map(str, cluster.settings.upstream_dns)) or "none configured"
        if args.json:
            print_json({"name": name, "type": rdtype, "forwarded": True,
                        "upstreams": [str(u) for u in cluster.settings.upstream_dns]})
        else:
            print(f"{name} is in none of the cluster's zones: a replica forwards it to the "
                  f"upstreams ({upstreams}) and caches the answer")
        return 0
    sections = {"answer": reply.answer, "authority": reply.authority,
                "additional": reply.additional}
    if args.json:
        print_json({"name": name, "type": rdtype, "forwarded": False,
                    "rcode": dns.rcode.to_text(reply.rcode()), "generation": cluster.generation,
                    **{key: [line for rrset in rrsets for line in rrset.to_text().splitlines()]
                       for key, rrsets in sections.items()}})
        return 0
    print(f"{name} {rdtype}: {dns.rcode.to_text(reply.rcode())}, authoritative "
          f"(generation {cluster.generation})")
    for key, rrsets in sections.items():
        for rrset in rrsets:
            for line in rrset.to_text().splitlines():
                print(f"  {key:<10} {line}")
    return 0

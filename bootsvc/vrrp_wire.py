"""VRRPv3 (RFC 5798) advertisements for IPv4: bytes in, a typed `Advertisement` out, and back.

The checks RFC 5798 section 7.1 asks of a receiver are made here, each failure a
`MalformedAdvert` subclass whose `reason` names the counter the service bumps before it drops
the packet:

    truncated, not_vrrp, bad_ttl, bad_version, bad_type, bad_checksum, address_count,
    bad_interval, wrong_vrid

`decode` takes what a raw IPv4 socket of protocol 112 hands over: the IP header and the VRRP
message. `encode` returns the VRRP message only (the kernel writes the IP header), with its
checksum over the IPv4 pseudo-header of the source and 224.0.0.18, as the RFC says.
`gratuitous_arp` is the frame a new master sends (RFC 5798 6.4.1).

The formats are a few fixed fields, packed here with `struct`; scapy is the tests' oracle
(tests/test_vrrp_wire.py: our bytes against its `VRRPv3`, `IP`, `ARP`, and keepalived's
captured adverts). It used to build them at run time, but importing its layers cost each
replica 42 MB and about 2 s of a TCG node's CPU at boot, in front of its first answer.
Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

PROTOCOL = 112
GROUP = ipaddress.IPv4Address("224.0.0.18")
TTL = 255
VERSION = 3
TYPE_ADVERTISEMENT = 1
HEADER_LENGTH = 8
MAX_INTERVAL = 4095          # centiseconds: the field has 12 bits
PRIORITY_SHUTDOWN = 0        # "the master stops: take over now"
PRIORITY_OWNER = 255         # the router that owns the address


class MalformedAdvert(Exception):
    """A packet that is not a VRRPv3 advertisement we may act on; `reason` names the counter."""

    reason = "malformed"


class Truncated(MalformedAdvert):
    reason = "truncated"


class NotVrrp(MalformedAdvert):
    reason = "not_vrrp"


class BadTtl(MalformedAdvert):
    reason = "bad_ttl"


class BadVersion(MalformedAdvert):
    reason = "bad_version"


class BadType(MalformedAdvert):
    reason = "bad_type"


class BadChecksum(MalformedAdvert):
    reason = "bad_checksum"


class AddressCountMismatch(MalformedAdvert):
    reason = "address_count"


class BadInterval(MalformedAdvert):
    reason = "bad_interval"


class WrongVrid(MalformedAdvert):
    reason = "wrong_vrid"


@dataclasses.dataclass(frozen=True)
class Advertisement:
    vrid: int
    priority: int
    interval: int                         # Max_Adver_Int, centiseconds
    addresses: tuple[ipaddress.IPv4Address, ...]
    source: ipaddress.IPv4Address = ipaddress.IPv4Address(0)

    def __post_init__(self) -> None:
        if not 1 <= self.vrid <= 255:
            raise ValueError(f"VRID {self.vrid} is not between 1 and 255")
        if not 0 <= self.priority <= 255:
            raise ValueError(f"priority {self.priority} is not between 0 and 255")
        if not 1 <= self.interval <= MAX_INTERVAL:
            raise ValueError(f"interval {self.interval} cs is not between 1 and {MAX_INTERVAL}")
        if not 1 <= len(self.addresses) <= 255:
            raise ValueError("an advertisement carries 1 to 255 addresses")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones' complement sum of
    16-bit words; over data that holds its own correct checksum, it is 0."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(source: bytes, destination: bytes, length: int) -> bytes:
    return source + destination + struct.pack("!BBH", 0, PROTOCOL, length)


def encode(advert: Advertisement, source: ipaddress.IPv4Address) -> bytes:
    """The VRRP message `source` sends to 224.0.0.18 (the checksum covers both addresses)."""
    addresses = b"".join(address.packed for address in advert.addresses)
    header = struct.pack("!BBBBH", VERSION << 4 | TYPE_ADVERTISEMENT, advert.vrid,
                         advert.priority, len(advert.addresses), advert.interval)
    message = header + b"\0\0" + addresses
    pseudo = _pseudo_header(source.packed, GROUP.packed, len(message))
    return header + struct.pack("!H", checksum(pseudo + message)) + addresses


def encode_ip(advert: Advertisement, source: ipaddress.IPv4Address, ttl: int = TTL) -> bytes:
    """The whole IP packet, for tests and tools that send on a raw IP socket with IP_HDRINCL
    (no options, identification 1, as scapy's `IP()` writes it)."""
    message = encode(advert, source)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(message), 1, 0, ttl, PROTOCOL, 0,
                         source.packed, GROUP.packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + message


def decode(data: bytes, vrid: int | None = None) -> Advertisement:
    """The advertisement in an IP packet from a raw socket, or a `MalformedAdvert`.

    With `vrid`, an advertisement of another virtual router is refused too (RFC 5798 7.1:
    several routers may share the group on one link, each ignores the others')."""
    if len(data) < 20:
        raise Truncated(f"{len(data)} bytes, shorter than an IP header")
    header_length = (data[0] & 0x0F) * 4
    if data[0] >> 4 != 4 or header_length < 20 or data[9] != PROTOCOL:
        raise NotVrrp("not an IPv4 packet of protocol 112")
    total = int.from_bytes(data[2:4], "big")
    if total > len(data) or total < header_length:
        raise Truncated(f"IP total length {total}, {len(data)} bytes received")
    message = data[header_length:total]
    if len(message) < HEADER_LENGTH:
        raise Truncated(f"VRRP message of {len(message)} bytes, less than its 8-byte header")
    # RFC 5798 7.1: a packet with any other TTL may have come from off the link.
    ttl = data[8]
    if ttl != TTL:
        raise BadTtl(f"TTL {ttl}, not {TTL}")
    version, kind = message[0] >> 4, message[0] & 0x0F
    if version != VERSION:
        raise BadVersion(f"version {version}, not {VERSION}")
    if kind != TYPE_ADVERTISEMENT:
        raise BadType(f"type {kind}, not {TYPE_ADVERTISEMENT} (advertisement)")
    # The sum over pseudo-header and message, checksum field included, is 0 when intact.
    source, destination = data[12:16], data[16:20]
    if checksum(_pseudo_header(source, destination, len(message)) + message) != 0:
        raise BadChecksum("checksum does not match (IPv4 pseudo-header and message)")
    advert_vrid, priority, count, interval = struct.unpack_from("!xBBBH", message)
    if count == 0 or len(message) != HEADER_LENGTH + 4 * count:
        raise AddressCountMismatch(f"{count} addresses announced in "
                                   f"{len(message) - HEADER_LENGTH} bytes of address list")
    if vrid is not None and advert_vrid != vrid:
        raise WrongVrid(f"VRID {advert_vrid}, not ours ({vrid})")
    interval &= MAX_INTERVAL          # the top 4 bits are reserved
    if interval == 0:
        # An interval of 0 would make the master-down timer fire at once, every time.
        raise BadInterval("advertisement interval 0")
    addresses = tuple(ipaddress.IPv4Address(message[offset:offset + 4])
                      for offset in range(HEADER_LENGTH, len(message), 4))
    return Advertisement(vrid=advert_vrid, priority=priority, interval=interval,
                         addresses=addresses, source=ipaddress.IPv4Address(source))


def gratuitous_arp(mac: str, address: ipaddress.IPv4Address) -> bytes:
    """The Ethernet frame of an ARP request for `address` from `address`, with `mac` as sender
    and target hardware address (RFC 5798 6.4.1): every host that has `address` cached
    replaces the old master's MAC with `mac`."""
    hardware = bytes.fromhex(mac.replace(":", ""))
    if len(hardware) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return (b"\xff" * 6 + hardware + struct.pack("!H", 0x0806)        # broadcast, type ARP
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)              # Ethernet/IPv4, request
            + hardware + address.packed + hardware + address.packed)
